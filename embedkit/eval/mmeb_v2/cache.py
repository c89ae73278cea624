"""Embeddings cached per task, keyed by the model's and the task's fingerprints, so a killed evaluation
resumes where it stopped and a finished task is never encoded twice.

Layout: ``<cache dir>/<model fp[:16]>/<task name>-<key[:16]>.pt`` with ``key`` the sha256 of the task's
pin fingerprint and its data fingerprint (every query's and corpus item's text and visuals, so an edited
annotation file or a different frame folder is a different entry). A file holds ``{"query": [Q, D],
"corpus": [C, D], "model": fp, "key": key}`` (float32 CPU tensors), written by rank 0 under a temporary
name and renamed when complete (``files.atomic_path``): a kill leaves either the whole file or none.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from embedkit.distributed.ranks import all_objects, rank_and_world
from embedkit.files import atomic_path


def model_fingerprint(model, settings: dict) -> str:
    """sha256 hex over the model's weights (every state-dict tensor's name, dtype, shape and bytes) and
    ``settings`` (what else decides an embedding: normalisation, the cut depth, the dtype, the item
    settings); the same weights opened from a checkpoint or an export give the same fingerprint."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(keys: list[str]) -> str:
    """sha256 hex of a task's item keys (``parsers.common.item_key`` of every query and corpus row)."""
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()


class EmbeddingCache:
    """The cache folder of one model (see the module docstring)."""

    def __init__(self, folder: str | Path, model_fp: str):
        self.folder, self.model_fp = Path(folder) / model_fp[:16], model_fp

    def path(self, name: str, key: str) -> Path:
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{key[:16]}.pt"

    def load(self, name: str, key: str) -> dict | None:
        """The cached embeddings of task ``name`` under ``key``, or None. Every rank decides alike (rank 0's
        view is shared): a file appearing between two ranks' looks cannot split them."""
        path = self.path(name, key)
        found = path.is_file()
        if rank_and_world()[1] > 1:
            found = all_objects(found)[0]
        if not found:
            return None
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if entry.get("model") != self.model_fp or entry.get("key") != key:
            return None
        return entry

    def save(self, name: str, key: str, query: torch.Tensor, corpus: torch.Tensor) -> None:
        """Rank 0 writes the entry atomically; the others have the same tensors and write nothing."""
        if rank_and_world()[0] != 0:
            return
        with atomic_path(self.path(name, key)) as tmp:
            torch.save({"query": query, "corpus": corpus, "model": self.model_fp, "key": key}, tmp)
