"""Optimizer and learning-rate schedule: linear warm-up, then cosine decay to lr * min_lr_ratio."""

from __future__ import annotations

import math

import torch


def build_optimizer(params, train: dict) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"], weight_decay=train["weight_decay"])
    return torch.optim.AdamW(params, lr=train["lr"], betas=tuple(train["betas"]), weight_decay=train["weight_decay"])


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The multiplier of the base lr at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, train: dict, total_steps: int):
    warmup = int(train["warmup"] * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total_steps, warmup, train["min_lr_ratio"])
    )
