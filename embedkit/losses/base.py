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

In-batch false negatives add another keyword: ``loss(q, p, n, rows=..., mask=CandidateMask)``.
The mask says which candidates of a query are not negatives of it (a copy of its positive by
content key, ``train.mask_duplicates``; or, with ``train.false_negative_margin``, one scoring
within the margin of the positive); they leave the softmax of that query. A loss that does not
take ``mask`` is called without it (``call_loss``), and trains as before, unmasked.

Teacher data adds a third keyword: ``loss(q, p, n, rows=..., mask=..., teacher=TeacherBatch)``
(``losses/teacher.py``: a teacher's embeddings of the batch's queries and candidates, or a judge's
scores of each example's own candidates, gathered across ranks like the embeddings, no gradient).
Only the wrappers that need it take it (``distill``, ``soft_labels``); ``call_loss`` passes it only
to a loss that takes it, like ``mask``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from embedkit.losses.similarity import dot_similarity, similarity_for


@dataclass
class LossOutput:
    loss: torch.Tensor
    #: named components for logging (``train/loss/<name>``), detached
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss(nn.Module):
    def forward(
        self, q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, rows: slice | None = None,
        mask: "CandidateMask | None" = None,
    ) -> LossOutput:
        raise NotImplementedError


def row_slice(rows: slice | None, batch: int) -> slice:
    """``rows`` as a concrete ``slice(start, stop)`` into a batch of ``batch`` examples."""
    start, stop, step = (rows or slice(None)).indices(batch)
    if step != 1 or stop <= start:
        raise ValueError(f"rows must be a non-empty contiguous slice, got {rows!r}")
    return slice(start, stop)


def accepts(loss_fn, keyword: str) -> bool:
    """Whether ``loss_fn`` takes ``keyword`` (by name, or through ``**kwargs``)."""
    import inspect

    target = loss_fn.forward if isinstance(loss_fn, nn.Module) else loss_fn
    params = inspect.signature(target).parameters.values()
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def accepts_rows(loss_fn) -> bool:
    """Whether ``loss_fn`` takes the ``rows`` keyword (the local-rows form of the contract)."""
    return accepts(loss_fn, "rows")


def accepts_mask(loss_fn) -> bool:
    """Whether ``loss_fn`` takes the ``mask`` keyword (in-batch false-negative masking)."""
    return accepts(loss_fn, "mask")


def call_loss(loss_fn, q, p, n=None, rows: slice | None = None, mask: "CandidateMask | None" = None,
              teacher=None) -> LossOutput:
    """``loss_fn(q, p, n, rows=rows, mask=mask, teacher=teacher)``, each keyword passed only when given
    and taken: without ``rows`` the loss computes the whole batch, without ``mask`` it is unmasked,
    without ``teacher`` (a ``losses.teacher.TeacherBatch``) it sees no teacher data."""
    given = {"rows": rows, "mask": mask, "teacher": teacher}
    kwargs = {k: v for k, v in given.items() if v is not None and accepts(loss_fn, k)}
    return loss_fn(q, p, n, **kwargs)


@dataclass
class CandidateMask:
    """Which candidates of a query are false negatives, left out of its softmax.

    ``keys``: int64 [B + B*K], the content key (``data.schema.content_key``) of every candidate of
    the (gathered) batch in candidate order (positives, then negatives example-major); a candidate
    whose key equals the query's positive's is a copy of it (same text, same pixels) and is dropped
    (``train.mask_duplicates``). In the candidate->query direction, a query whose positive has the
    key of p_i is dropped from p_i's candidates. None: no duplicate masking.

    ``margin``: also drop every non-target candidate whose similarity exceeds the target's minus
    ``margin`` (UniME drops those above positive + 0.1, i.e. margin -0.1). None: no margin filter.
    The target column is never dropped.
    """

    keys: torch.Tensor | None = None
    margin: float | None = None

    def excluded(self, sim: torch.Tensor, targets: torch.Tensor, column_keys: torch.Tensor | None) -> torch.Tensor:
        """Bool [rows, C]: the columns of ``sim`` dropped from each row's softmax (never its target)."""
        out = torch.zeros_like(sim, dtype=torch.bool)
        if self.keys is not None and column_keys is not None:
            column_keys = column_keys.to(sim.device)
            out |= column_keys[None, :] == column_keys[targets][:, None]
        if self.margin is not None:
            s = sim.detach()
            out |= s > s.gather(1, targets[:, None]) - self.margin
        return out.scatter(1, targets[:, None], False)


def candidates(p: torch.Tensor, n: torch.Tensor | None) -> torch.Tensor:
    """All candidates of a batch, [B + B*K, ...]: the positives, then each example's negatives in order
    (``...`` is D for single vectors, T, d for token-vector sets)."""
    if n is None or n.shape[1] == 0:
        return p
    return torch.cat([p, n.reshape(-1, *p.shape[1:])], dim=0)


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
    mask: CandidateMask | None = None,
    similarity=None,
    maxsim: str = "sum",
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

    ``mask`` (``CandidateMask``) drops in-batch false negatives: in q2c the candidates that copy
    q_i's positive (or score within the margin of it), in c2q the queries whose positive copies
    p_i; the formulas are the same with those columns removed. Then the part
    ``masked_negatives`` counts the dropped (query, candidate) pairs of q2c over ``rows``.

    ``similarity(a [r, ...], b [C, ...]) -> [r, C]`` scores every pair; None picks it by the shape
    (``losses.similarity.similarity_for``): the dot product for single vectors [n, D], MaxSim for the token-vector
    sets [n, T, d] of ``model.pooling=multi_vector``, summed over the query's tokens or, with
    ``maxsim="mean"`` (the losses' default), averaged (``mean_maxsim_similarity``). In c2q the logit
    of (p_i, q_j) is s(q_j, p_i), the same score as in q2c (MaxSim is not symmetric).

    Parts (detached): ``q2c``, ``c2q`` when bidirectional, ``temperature``, ``masked_negatives``
    when masked.
    """
    own = row_slice(rows, q.shape[0])
    targets = torch.arange(own.start, own.stop, device=q.device)
    keys = mask.keys if mask is not None else None
    sim = similarity or similarity_for(q, maxsim)
    q2c, dropped = _cross_entropy(sim(q[own], candidates(p, n)), targets, temperature, alpha, mask, keys)
    parts = {"q2c": q2c.detach(), "temperature": temperature.detach()}
    if mask is not None:
        parts["masked_negatives"] = dropped
    if not bidirectional:
        return LossOutput(q2c, parts)
    c2q_sim = p[own] @ q.T if sim is dot_similarity else sim(q, p[own]).T
    c2q, _ = _cross_entropy(c2q_sim, targets, temperature, alpha, mask,
                            None if keys is None else keys[: p.shape[0]])
    parts["c2q"] = c2q.detach()
    return LossOutput((q2c + c2q) / 2, parts)


def _cross_entropy(sim: torch.Tensor, targets: torch.Tensor, tau: torch.Tensor, alpha: float,
                   mask: CandidateMask | None = None, column_keys: torch.Tensor | None = None):
    """One direction: (mean over rows of -log softmax at ``targets`` of sim/τ + α·sg(sim) off-target,
    the number of dropped columns).

    ``sim`` [rows, C] holds each row's similarities to all C columns (its candidates). Every logit
    of both directions is formed here, and this is the one place where columns are excluded: the
    ``mask``'s false negatives of each row (``column_keys`` [C]: the content key of the positive
    each column stands for) get logit -inf, i.e. leave the softmax.
    """
    logits = sim / tau
    if alpha:
        # the target keeps weight 1; skipped at α = 0 so InfoNCE runs no extra ops
        logits = logits + (alpha * sim.detach()).scatter(1, targets[:, None], 0.0)
    dropped = None
    if mask is not None:
        excluded = mask.excluded(sim, targets, column_keys)
        logits = logits.masked_fill(excluded, float("-inf"))
        dropped = excluded.sum().detach().to(torch.float32)
    return F.cross_entropy(logits, targets), dropped
