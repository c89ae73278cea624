"""Tiny random models of the real classes, for tests."""

from __future__ import annotations

import torch

from embedkit.config.loader import compose
from embedkit.encoder import Encoder


def tiny_encoder(family: str, *extra: str) -> Encoder:
    """A tiny random encoder (the demo recipe with ``family``'s tiny backbone, ``extra`` overrides) with every
    weight moved off its initialisation: a fresh RMSNorm's weight is all ones, and last-token pooling + L2
    normalisation cannot tell such a norm from none."""
    cfg = compose(["recipe=demo", f"model.backbone.name={family}", "model.backbone.tiny=true", *extra])
    encoder = Encoder.from_config(cfg["model"], seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
    return encoder
