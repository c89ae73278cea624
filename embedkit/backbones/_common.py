"""Helpers shared by the backbone adapters: checkpoint-path checks, seeding, right padding.

Not a component (the leading underscore keeps the registry from importing it as one).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from embedkit.backbones.base import IMAGE_PLACEHOLDER
from embedkit.errors import UserError


def supported_families() -> str:
    from embedkit.config import registry

    return ", ".join(registry.choices("backbone"))


def checkpoint_model_type(path: str, family: str) -> str:
    """The ``model_type`` in ``path/config.json``; UserError naming the path when it is unusable.

    Only local directories are checked here; a hub id (``org/name`` that is not a local path) is left
    to ``from_pretrained``, whose failure is turned into a UserError by ``load_error``.
    """
    p = Path(path).expanduser()
    looks_local = p.is_absolute() or path.startswith((".", "~")) or p.exists() or path.count("/") != 1
    if not looks_local:
        return ""
    if not p.is_dir():
        raise UserError(
            f"model.backbone.path: {path} does not exist (or is not a directory); "
            f"{family} needs a checkpoint directory or a hub id"
        )
    cfg = p / "config.json"
    if not cfg.is_file():
        raise UserError(f"model.backbone.path: {path} has no config.json; supported families: {supported_families()}")
    try:
        return str(json.loads(cfg.read_text()).get("model_type", ""))
    except json.JSONDecodeError as exc:
        raise UserError(f"model.backbone.path: {cfg} is not valid JSON ({exc})") from None


def require_model_type(path: str, family: str, accepted: tuple[str, ...]) -> None:
    model_type = checkpoint_model_type(path, family)
    if model_type and model_type not in accepted:
        raise UserError(
            f"model.backbone.path: {path} holds a {model_type!r} checkpoint, which backbone {family!r} "
            f"does not load (it loads {', '.join(accepted)}); supported families: {supported_families()}"
        )


def load_error(path: str, family: str, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"model.backbone.path: cannot load {family} checkpoint {path} ({first})")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def split_placeholder(text: str) -> list[str]:
    return text.split(IMAGE_PLACEHOLDER)


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id rows: ``(input_ids [B, T], attention_mask [B, T])``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def placeholder_error(family: str) -> ValueError:
    return ValueError(f"{family}: an item's text contains {IMAGE_PLACEHOLDER} but the item has no image")


def set_trainable(module: torch.nn.Module, prefixes: tuple[str, ...], trainable: bool) -> None:
    for name, param in module.named_parameters():
        if any(name.startswith(p) for p in prefixes):
            param.requires_grad_(trainable)


def env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
