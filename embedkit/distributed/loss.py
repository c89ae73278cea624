"""Cross-device negatives: one call, ``distributed_loss(loss_fn, q, p, n) -> LossOutput``.

The LightningModule (and GradCache's cache step) calls only this. Not distributed (or one rank):
it is exactly ``loss_fn(q, p, n)``. Distributed, on each rank with its local q [b,D], p [b,D],
n [b,K,D] | None:

1. One all-gather with gradients of the packed rows ``[q; p; n.flatten]`` (a single collective,
   so the backward collectives cannot be ordered differently on different ranks).
2. Unpack into the GLOBAL batch in rank order: Q [W*b,D], P [W*b,D], N [W*b,K,D]. Global example
   i = rank*b + j keeps its own query, positive and K negatives together, so the candidate layout
   is the same as single-process on the full batch: all positives P (column i is the target of
   query i), then every example's negatives in order. Negatives are never mistaken for positives
   (the bug class of sentence-transformers PR #3453, where anchors were trained toward hard
   negatives because gathered columns and labels disagreed).
3. ``loss_fn(Q, P, N, rows=slice(rank*b, rank*b+b))``: this rank's loss rows only, targets offset
   by ``rank*b``, averaged over the b local rows.

Scaling convention (what gradient each rank ends with):
    Let L = full-batch loss (mean over the W*b rows) and L_r = the mean over rank r's rows, so
    L = (1/W) Σ_r L_r. The gather's backward sums over ranks, so rank r's local embeddings get
    Σ_r' ∂L_r'/∂e_r = W · ∂L/∂e_r, and its parameters end with W · (the full-batch gradient that
    flows through rank r's embeddings). Parameters inside the loss (a learnable τ) get ∂L_r/∂τ.
    The gradient sync must therefore AVERAGE over ranks (what DDP does): (1/W) Σ_r W·∂L/∂θ|_r
    = ∂L/∂θ, and (1/W) Σ_r ∂L_r/∂τ = ∂L/∂τ, exactly the single-process full-batch gradient. A
    hand-written sync (e.g. GradCache with the DDP reducer kept out of the chunk backwards) must
    all-reduce with SUM and divide by W, never SUM alone. The loss VALUE on each rank is L_r; log
    its mean over ranks (``sync_dist=True``) to report L.

    A loss that does not take ``rows`` gets the whole gathered batch on every rank: each rank then
    computes L itself, the gather backward gives W · ∂L/∂e_r, and DDP's average again yields ∂L/∂θ;
    correct, just W-fold redundant loss compute. Wrappers may mix both forms.

In-batch false negatives (``mask``, a ``losses.base.CandidateMask``): its ``keys`` are this rank's
candidates' content keys [b + b*K]; they are all-gathered too (integers, no gradient) and laid out
like the gathered candidates (every rank's positives, then every rank's negatives), so a copy of a
query's positive held by another rank is masked as well.

Teacher data (``teacher``, a ``losses.teacher.TeacherBatch``: a teacher's embeddings of this rank's
queries [b, Dt] and candidates [b + b*K, Dt], a judge's scores [b, 1 + K]) is all-gathered without
gradients (a teacher is fixed) into the same global layout: queries and score rows in rank order, the
candidates as the keys (every rank's positives, then every rank's negatives).

Embeddings may carry more than one vector per item ([b, L, D] per layer for ``matryoshka_2d``,
[b, T, d] token sets for ``multi_vector``, padded to a fixed T): the trailing shape travels as is.
Every rank must have the same b, K and trailing shape (the per-rank batch is fixed; hard negatives are padded or
cut to exactly K by the data pipeline).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from embedkit.distributed.gather import all_gather_with_grad
from embedkit.distributed.ranks import is_distributed
from embedkit.losses.base import CandidateMask, LossOutput, call_loss
from embedkit.losses.teacher import TeacherBatch


def gather_batch(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None, group=None):
    """(Q, P, N, rows): the global batch in rank order and this rank's slice of it."""
    b, tail = q.shape[0], q.shape[1:]  # tail: (D,), or (L, D) / (T, d) for per-layer and token sets
    k = 0 if n is None else n.shape[1]
    packed = torch.cat([q, p] + ([n.reshape(b * k, *tail)] if k else []), dim=0)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    per_rank = all_gather_with_grad(packed, group).view(world, (2 + k) * b, *tail)
    Q = per_rank[:, :b].reshape(world * b, *tail)
    P = per_rank[:, b : 2 * b].reshape(world * b, *tail)
    N = per_rank[:, 2 * b :].reshape(world * b, k, *tail) if k else None
    return Q, P, N, slice(rank * b, (rank + 1) * b)


def gather_keys(keys: torch.Tensor, b: int, group=None) -> torch.Tensor:
    """Candidate keys [b + b*K] (or per-candidate rows [b + b*K, ...]) of every rank -> the gathered
    candidate layout [W*b + W*b*K, ...]."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(keys) for _ in range(world)]
    dist.all_gather(parts, keys.contiguous(), group=group)
    per_rank = torch.stack(parts)  # [W, b + b*K, ...]
    tail = keys.shape[1:]
    return torch.cat([per_rank[:, :b].reshape(-1, *tail), per_rank[:, b:].reshape(-1, *tail)])


def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """``x`` [b, ...] of every rank concatenated in rank order, without gradients."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


def gather_teacher(teacher: TeacherBatch, b: int, group=None) -> TeacherBatch:
    """This rank's teacher data -> the gathered batch's (the module docstring's layout)."""
    def rows(x):
        return None if x is None else gather_rows(x, group)

    cands = None if teacher.candidates is None else gather_keys(teacher.candidates, b, group)
    return TeacherBatch(rows(teacher.queries), cands, rows(teacher.scores))


def distributed_loss(loss_fn, q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, group=None,
                     mask: CandidateMask | None = None, teacher: TeacherBatch | None = None) -> LossOutput:
    """``loss_fn`` over the candidates of all ranks for this rank's queries; plain call otherwise.
    ``mask`` and ``teacher`` are passed to losses that take them (``call_loss``), the mask's keys and the
    teacher's data gathered like the candidates."""
    if not is_distributed():
        return call_loss(loss_fn, q, p, n, mask=mask, teacher=teacher)
    Q, P, N, rows = gather_batch(q, p, n, group)
    if mask is not None and mask.keys is not None:
        mask = CandidateMask(gather_keys(mask.keys.to(q.device), q.shape[0], group), mask.margin)
    if teacher is not None:
        teacher = gather_teacher(teacher, q.shape[0], group)
    return call_loss(loss_fn, Q, P, N, rows=rows, mask=mask, teacher=teacher)
