"""Optimizer, learning-rate schedule and run length.

Schedule (``train.schedule``): linear warm-up over ``train.warmup`` of the steps, then

- ``cosine``: half-cosine decay to ``lr * min_lr_ratio`` (the LLaVE trainer's HF ``cosine``);
- ``linear``: straight line to ``lr * min_lr_ratio`` at the last step (HF ``linear``, VLM2Vec);
- ``constant``: flat at ``lr``.

Run length: ``trainer.max_epochs > 0`` turns into optimizer steps from the training examples'
count (``total_steps``), as an epoch-based HF Trainer run with ``dataloader_drop_last`` would.
"""

from __future__ import annotations

import math

import torch

from embedkit.data.shard_set import ShardSet
from embedkit.errors import UserError


def build_optimizer(params, train: dict) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"], weight_decay=train["weight_decay"])
    return torch.optim.AdamW(params, lr=train["lr"], betas=tuple(train["betas"]), weight_decay=train["weight_decay"])


def lr_multiplier(step: int, total: int, warmup: int, min_ratio: float, schedule: str = "cosine") -> float:
    """The multiplier of the base lr at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * decay


def build_scheduler(optimizer, train: dict, total_steps: int):
    warmup = int(train["warmup"] * total_steps)
    schedule, min_ratio = train["schedule"], train["min_lr_ratio"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, warmup, min_ratio, schedule)
    )


# -- run length -----------------------------------------------------------------------------------
def count_examples(shards: list[str]) -> int:
    """Training examples in ``shards``: each source's count from its shard set's manifest (written by
    ``embedkit data mmeb`` and ``embedkit mine``), else the samples of its tars (``ShardSet.count``)."""
    return ShardSet(shards).total()


def total_steps(max_steps: int, max_epochs: int, shards: list[str], examples_per_step: int) -> int:
    """Optimizer steps of the run: ``max_steps``, or with ``max_epochs > 0`` that many passes over
    the examples of ``shards`` (the last incomplete step dropped)."""
    if max_epochs <= 0:
        return max_steps
    examples = count_examples(shards)
    steps = max_epochs * examples // examples_per_step
    if steps < 1:
        raise UserError(f"trainer.max_epochs={max_epochs}: {examples} training examples make no full optimizer "
                        f"step of {examples_per_step} (train.global_batch_size x train.accumulate_steps)")
    return steps
