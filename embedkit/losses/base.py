"""The loss contract.

``loss(q [B,D], p [B,D], n [B,K,D] | None) -> LossOutput(loss, parts)``. The candidates of query
q_i are every positive and every hard negative in the batch (gathered across ranks by
``embedkit.distributed``); the target is p_i. Losses see embeddings only and never call the model,
so wrappers (Matryoshka) compose with every loss and with GradCache.

Cross-device negatives add one keyword: ``loss(q, p, n, rows=slice(a, b))``. Then ``q, p, n`` are
the GATHERED batch (every rank's examples, rank order) and the loss computes only the rows
``a:b`` (this rank's examples; their targets are the global indices ``a..b-1``), averaged over those
rows. ``rows=None`` (the default) means every row, so ``loss(q, p, n)`` is the whole-batch loss. A
loss that does not take ``rows`` still trains correctly under ``embedkit.distributed`` (each rank
then computes the whole gathered batch): see ``embedkit/distributed/loss.py`` for why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LossOutput:
    loss: torch.Tensor
    #: named components for logging (``train/loss/<name>``), detached
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss(nn.Module):
    def forward(
        self, q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, rows: slice | None = None
    ) -> LossOutput:
        raise NotImplementedError


def row_slice(rows: slice | None, batch: int) -> slice:
    """``rows`` as a concrete ``slice(start, stop)`` into a batch of ``batch`` examples."""
    start, stop, step = (rows or slice(None)).indices(batch)
    if step != 1 or stop <= start:
        raise ValueError(f"rows must be a non-empty contiguous slice, got {rows!r}")
    return slice(start, stop)


def accepts_rows(loss_fn) -> bool:
    """Whether ``loss_fn`` takes the ``rows`` keyword (the local-rows form of the contract)."""
    import inspect

    target = loss_fn.forward if isinstance(loss_fn, nn.Module) else loss_fn
    params = inspect.signature(target).parameters.values()
    return any(p.name == "rows" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def call_loss(loss_fn, q, p, n=None, rows: slice | None = None) -> LossOutput:
    """``loss_fn(q, p, n, rows=rows)``, or the whole batch when ``loss_fn`` does not take ``rows``."""
    if rows is not None and accepts_rows(loss_fn):
        return loss_fn(q, p, n, rows=rows)
    return loss_fn(q, p, n)


def candidates(p: torch.Tensor, n: torch.Tensor | None) -> torch.Tensor:
    """All candidates of a batch, [B + B*K, D]: the positives, then each example's negatives in order."""
    if n is None or n.shape[1] == 0:
        return p
    return torch.cat([p, n.reshape(-1, n.shape[-1])], dim=0)


class Temperature(nn.Module):
    """τ, fixed or learnable; learnable τ is stored as log(1/τ) (CLIP's parametrisation).

    A fixed τ stays a Python float (exact in any dtype; a float32 buffer would round 0.05 and shift
    float64 losses by ~1e-6) and is used as given. A learnable τ's 1/τ is capped at 100, as in
    CLIP, so it cannot drift into an unstable scale.
    """

    MAX_SCALE = 100.0

    def __init__(self, value: float, learnable: bool):
        super().__init__()
        if value <= 0:
            raise ValueError("temperature must be positive")
        self.learnable = learnable
        self.value = float(value)
        if learnable:
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / value)))

    def forward(self) -> torch.Tensor:
        if not self.learnable:
            return torch.tensor(self.value, dtype=torch.float64)
        return 1.0 / self.log_scale.clamp(max=math.log(self.MAX_SCALE)).exp()
