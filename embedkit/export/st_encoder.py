"""A sentence-transformers model folder behind the ``Encoder`` interface eval uses (text only)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from embedkit.encoder import Provenance
from embedkit.errors import UserError


class STEncoder(nn.Module):
    """``encode_items(items, batch_size)`` through ``SentenceTransformer.encode``, and the
    ``provenance`` every model ``open_model`` gives carries; items with images or a video are refused in one
    line (sentence-transformers' image path needs torchvision, absent on CPU torch, and it has no video)."""

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise UserError("model: scoring a sentence-transformers folder needs the `st` extra "
                            "(pip install 'embedkit[st]')") from None
        self.model = SentenceTransformer(str(path), device="cpu")
        self.normalize = True
        #: nothing is known about its training: no config, step 0
        self.provenance = Provenance(kind="sentence_transformers", source=Path(path))

    @torch.no_grad()
    def encode_items(self, items, batch_size: int = 32, side: str | None = None) -> torch.Tensor:
        # ``side``: a sentence-transformers folder frames queries and documents alike (taken, not used)
        if any(it.has_visual for it in items):
            raise UserError("model: this sentence-transformers folder is scored on text only; an item has an image "
                            "or a video (choose text datasets with data.eval.datasets=[...])")
        emb = self.model.encode([it.text or "" for it in items], batch_size=batch_size, convert_to_tensor=True,
                                normalize_embeddings=True)
        return emb.float().cpu()
