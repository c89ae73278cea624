"""Helpers shared by the backbone adapters: seeding, right padding, placeholder and freezing checks.

Not a component (the leading underscore keeps the registry from importing it as one).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from embedkit.backbones.base import IMAGE_PLACEHOLDER
from embedkit.errors import UserError


def load_error(path: str, family: str, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"model.backbone.path: cannot load {family} checkpoint {path} ({first})")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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
