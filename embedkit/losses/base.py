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
import torch.nn.functional as F
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


def check_temperature(params: dict) -> None:
    """The ``temperature`` check shared by the losses' ``check_config``: τ must be positive."""
    if params["temperature"] <= 0:
        raise ValueError(f"temperature: must be positive, got {params['temperature']}")


class Temperature(nn.Module):
    """τ, fixed or learnable; learnable τ is stored as log(1/τ) (CLIP's parametrisation).

    A fixed τ stays a Python float (exact in any dtype; a float32 buffer would round 0.05 and shift
    float64 losses by ~1e-6) and is used as given. A learnable τ's 1/τ is capped at 100, as in
    CLIP, so it cannot drift into an unstable scale. The value is checked by the owning loss
    (``check_temperature`` in its ``check_config``), not here.
    """

    MAX_SCALE = 100.0

    def __init__(self, value: float, learnable: bool):
        super().__init__()
        self.learnable = learnable
        self.value = float(value)
        if learnable:
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / value)))

    def forward(self) -> torch.Tensor:
        if not self.learnable:
            return torch.tensor(self.value, dtype=torch.float64)
        return 1.0 / self.log_scale.clamp(max=math.log(self.MAX_SCALE)).exp()


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor | None = None,
    *,
    temperature: torch.Tensor,
    rows: slice | None = None,
    alpha: float = 0.0,
    bidirectional: bool = False,
) -> LossOutput:
    """The one contrastive core: InfoNCE, optionally hardness-weighted and bidirectional.

    q2c (query -> candidates): for each query q_i of ``rows`` the logits are s(q_i, c) / τ over
    ``candidates(p, n)`` (every positive, then every hard negative) and the target is p_i, at its
    global index i (so under ``rows=slice(a, b)`` the targets are a..b-1). c2q (``bidirectional``):
    for each positive p_i of ``rows`` the candidates are all queries, the target q_i. The loss is
    q2c, or the mean of the two directions. ``temperature`` is τ as a tensor (``Temperature()``).

    ``alpha`` is LLaVE's hardness weight (Lan et al. 2025, arXiv 2503.04812, §3): every non-target
    pair gets weight w = exp(α · s), a constant (no gradient through it), which is α · stopgrad(s)
    added to its logit. α = 0 is InfoNCE (van den Oord et al. 2018, arXiv 1807.03748).

    Parts (detached): ``q2c``, ``c2q`` when bidirectional, ``temperature``.
    """
    own = row_slice(rows, q.shape[0])
    targets = torch.arange(own.start, own.stop, device=q.device)
    q2c = _cross_entropy(q[own] @ candidates(p, n).T, targets, temperature, alpha)
    parts = {"q2c": q2c.detach(), "temperature": temperature.detach()}
    if not bidirectional:
        return LossOutput(q2c, parts)
    c2q = _cross_entropy(p[own] @ q.T, targets, temperature, alpha)
    parts["c2q"] = c2q.detach()
    return LossOutput((q2c + c2q) / 2, parts)


def _cross_entropy(sim: torch.Tensor, targets: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """One direction: mean over rows of -log softmax at ``targets`` of sim/τ + α·sg(sim) off-target.

    ``sim`` [rows, C] holds each row's similarities to all C columns (its candidates). Every logit
    of both directions is formed here, so a later change to which columns count (excluding in-batch
    false negatives, say) is made in this one function.
    """
    logits = sim / tau
    if alpha:
        # the target keeps weight 1; skipped at α = 0 so InfoNCE runs no extra ops
        logits = logits + (alpha * sim.detach()).scatter(1, targets[:, None], 0.0)
    return F.cross_entropy(logits, targets)
