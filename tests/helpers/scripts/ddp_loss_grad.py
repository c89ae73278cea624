"""2-process CPU DDP (gloo, 127.0.0.1): gradients with cross-device negatives == single-process.

    python tests/helpers/scripts/ddp_loss_grad.py OUT.json

A small encoder (nn.Linear + L2 normalise) is trained one step with each loss on a global batch of
W*b examples with K hard negatives each. Each rank encodes its b examples, calls
``embedkit.distributed.distributed_loss`` and backpropagates under DistributedDataParallel (which
averages gradients). Rank 0 also computes the single-process full-batch gradient and writes, per
loss, the largest gradient difference, the loss-value difference and whether the gathered batch
equals the full batch. A deliberately wrong variant (gather without gradients) is included so the
check is shown to be able to fail.

The ``masked_*`` variants plant copies across ranks (rank 1's positive repeats rank 0's; a hard
negative on rank 0 copies a positive on rank 1; one copies its own example's positive) and pass
``mask=CandidateMask(local content keys)``: the gathered masked loss and its gradient must equal the
single-process full-batch masked loss (tests/losses/test_false_negatives.py ties that to the formula).

The ``TOKEN_SETS`` variants encode token-vector sets [n, 4, 4] with 2..4 real tokens (zero vectors
pad), the shape of ``model.pooling=multi_vector``: the gather moves the trailing shape as is and the
losses score by MaxSim.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD, B_LOCAL, K, D_IN, D = 2, 3, 2, 10, 16

LOSSES = {
    "infonce": {"name": "infonce"},
    "infonce_bidirectional_learnable": {"name": "infonce", "bidirectional": True, "learnable_temperature": True},
    "hardness_weighted": {"name": "hardness_weighted", "alpha": 4.0, "temperature": 0.05},
    "hardness_weighted_learnable": {"name": "hardness_weighted", "learnable_temperature": True},
    "matryoshka_hardness_weighted": {"name": "matryoshka", "inner": "hardness_weighted", "dims": [4, 8, 16]},
    "matryoshka_infonce": {"name": "matryoshka", "inner": {"name": "infonce", "bidirectional": True}, "dims": [8, 16], "weights": [0.5, 2.0]},
    "rowless_plugin_style": None,  # a loss without the ``rows`` keyword: whole batch on every rank
    # token-vector sets [n, 4, 4] (model.pooling=multi_vector's shape) scored by MaxSim
    "multi_vector_infonce": {"name": "infonce", "bidirectional": True},
}
#: variants whose model emits token-vector sets (some slots zero: padding) instead of single vectors
TOKEN_SETS = {"multi_vector_infonce", "masked_multi_vector_hardness_weighted"}
#: variant -> (loss, margin): in-batch false negatives masked by content key (and margin)
MASKED = {
    "masked_infonce": ("infonce", None),
    "masked_infonce_bidirectional_learnable": ("infonce_bidirectional_learnable", None),
    "masked_hardness_weighted": ("hardness_weighted", None),
    "masked_hardness_weighted_margin": ("hardness_weighted", 0.2),
    "masked_matryoshka_hardness_weighted": ("matryoshka_hardness_weighted", None),
    "masked_multi_vector_hardness_weighted": ("hardness_weighted", None),
    "masked_distill_hardness_weighted": ("distill_hardness_weighted", None),
}
#: the teacher wrappers (``embedkit teach`` data, ``losses/teacher.TeacherBatch``): each rank passes its
#: local teacher rows, ``distributed_loss`` gathers them; the reference gets the whole batch's
TEACHER_LOSSES = {
    "distill_infonce": {"name": "distill", "inner": "infonce", "directions": ["q2c", "c2q"]},
    "distill_hardness_weighted": {"name": "distill", "inner": {"name": "hardness_weighted", "alpha": 4.0},
                                  "student_temperature": 0.1, "teacher_temperature": 0.05},
    "soft_labels_infonce": {"name": "soft_labels", "inner": "infonce", "judge_temperature": 0.2},
    "soft_labels_hardness_weighted": {"name": "soft_labels", "inner": "hardness_weighted"},
}
LOSSES.update(TEACHER_LOSSES)
TEACHER = set(TEACHER_LOSSES) | {"masked_distill_hardness_weighted"}


class Rowless(nn.Module):
    """A user loss written only as loss(q, p, n): InfoNCE with a learnable τ, no ``rows``."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(3.0))

    def forward(self, q, p, n=None):
        from embedkit.losses.base import LossOutput, candidates

        logits = q @ candidates(p, n).T * self.log_scale.exp()
        return LossOutput(F.cross_entropy(logits, torch.arange(q.shape[0])))


class Model(nn.Module):
    def __init__(self, loss: nn.Module, token_sets: bool = False):
        super().__init__()
        self.encoder = nn.Linear(D_IN, D)
        self.loss = loss  # a submodule, as in the LightningModule: DDP syncs a learnable τ too
        self.token_sets = token_sets

    def forward(self, x):
        if not self.token_sets:
            return F.normalize(self.encoder(x), dim=-1)
        tokens = F.normalize(self.encoder(x).view(len(x), 4, D // 4), dim=-1)
        real = torch.arange(4)[None, :] < 2 + (x[:, :2] > 0).sum(dim=1, keepdim=True)  # 2..4 real tokens
        return tokens * real[..., None]


def build_loss(block):
    from embedkit.config import registry, schema

    if block is None:
        return Rowless()
    return registry.build("loss", schema._component("loss", block, "infonce", "loss"), embedding_dim=D)


def global_batch(seed: int, planted: bool = False):
    g = torch.Generator().manual_seed(seed)
    n = WORLD * B_LOCAL
    xq, xp, xn = (torch.randn(n, D_IN, generator=g, dtype=torch.float64),
                  torch.randn(n, D_IN, generator=g, dtype=torch.float64),
                  torch.randn(n, K, D_IN, generator=g, dtype=torch.float64))
    keys = list(range(n)) + [100 + i for i in range(n * K)]  # global candidate layout
    if planted:  # queries near their positives: a copy of the positive then weighs in every softmax
        xq = xp + 0.3 * torch.randn(n, D_IN, generator=g, dtype=torch.float64)
        for dst, src in ((4, 0),):  # rank 1's example 1 has rank 0's example 0's positive
            xp[dst] = xp[src]
            keys[dst] = keys[src]
        for (i, m), src in (((1, 0), 5), ((5, 1), 5), ((2, 1), 3)):  # negatives copying positives
            xn[i, m] = xp[src]
            keys[n + i * K + m] = keys[src]
    return xq, xp, xn, torch.tensor(keys, dtype=torch.int64)


def local_keys(keys: torch.Tensor, rank: int) -> torch.Tensor:
    n = WORLD * B_LOCAL
    return torch.cat([keys[rank * B_LOCAL:(rank + 1) * B_LOCAL],
                      keys[n + rank * B_LOCAL * K:n + (rank + 1) * B_LOCAL * K]])


def teacher_data(label: str, seed: int, rank: int):
    """(this rank's TeacherBatch, the whole batch's), or (None, None) for a loss without a teacher:
    teacher embeddings [n, 5] of the queries and [n + n*K, 5] of the candidates, judge scores [n, 1+K]."""
    from embedkit.losses.base import candidates
    from embedkit.losses.teacher import TeacherBatch

    if label not in TEACHER:
        return None, None
    g = torch.Generator().manual_seed(seed)
    n = WORLD * B_LOCAL
    tq, tp, tn = (F.normalize(torch.randn(*shape, 5, generator=g, dtype=torch.float64), dim=-1)
                  for shape in ((n,), (n,), (n, K)))
    scores = torch.rand(n, 1 + K, generator=g, dtype=torch.float64)
    own = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    local = TeacherBatch(tq[own], candidates(tp[own], tn[own]), scores[own])
    return local, TeacherBatch(tq, candidates(tp, tn), scores)


def encode(model, xq, xp, xn):
    b = xq.shape[0]
    e = model(torch.cat([xq, xp, xn.reshape(-1, D_IN)]))
    return e[:b], e[b : 2 * b], e[2 * b :].reshape(b, K, *e.shape[1:])


def detached_gather_loss(loss_fn, q, p, n):
    """The bug: other ranks' embeddings gathered without gradients (own slot kept)."""
    rank = dist.get_rank()
    outs = []
    for x in (q, p, n):
        parts = [torch.empty_like(x) for _ in range(WORLD)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[rank] = x
        outs.append(torch.cat(parts))
    return loss_fn(*outs, rows=slice(rank * B_LOCAL, (rank + 1) * B_LOCAL))


def worker(rank: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    from embedkit.distributed import distributed_loss
    from embedkit.distributed.loss import gather_batch
    from embedkit.losses.base import CandidateMask, call_loss

    results = {}
    own = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    variants = [(name, name, False) for name in LOSSES] + [("detached_gather_bug", "hardness_weighted", True)]
    variants += [(name, MASKED[name][0], False) for name in MASKED]
    for i, (label, loss_name, buggy) in enumerate(variants):
        torch.manual_seed(i)
        model = Model(build_loss(LOSSES[loss_name]), token_sets=label in TOKEN_SETS).double()
        reference = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        xq, xp, xn, keys = global_batch(seed=100 + i, planted=label in MASKED)
        mask = full_mask = None
        if label in MASKED:
            mask = CandidateMask(local_keys(keys, rank), MASKED[label][1])
            full_mask = CandidateMask(keys, MASKED[label][1])
        teacher, full_teacher = teacher_data(label, 200 + i, rank)
        q, p, n = encode(ddp, xq[own], xp[own], xn[own])
        if buggy:
            out = detached_gather_loss(model.loss, q, p, n)
        else:
            out = distributed_loss(model.loss, q, p, n, mask=mask, teacher=teacher)
        masked = out.parts.get("masked_negatives", torch.tensor(0.0)).clone().double()
        dist.all_reduce(masked)
        out.loss.backward()
        loss_value = out.loss.detach().clone()
        dist.all_reduce(loss_value)
        loss_value /= WORLD
        with torch.no_grad():
            Q, P, N, rows = gather_batch(q, p, n)
        if rank == 0:
            fq, fp, fn = encode(reference, xq, xp, xn)
            full = call_loss(reference.loss, fq, fp, fn, mask=full_mask, teacher=full_teacher)
            full.loss.backward()
            grad_diff = max(
                (a.grad - b.grad).abs().max().item()
                for a, b in zip(model.parameters(), reference.parameters())
            )
            results[label] = {
                "grad_max_abs_diff": grad_diff,
                "grad_scale": max(b.grad.abs().max().item() for b in reference.parameters()),
                "loss_abs_diff": abs(loss_value.item() - full.loss.item()),
                "layout_max_abs_diff": max((X - F_).abs().max().item() for X, F_ in ((Q, fq), (P, fp), (N, fn))),
                "rows": [rows.start, rows.stop],
                "parts": sorted(out.parts),
                "masked_negatives": masked.item(),
                "full_masked_negatives": full.parts.get("masked_negatives", torch.tensor(0.0)).item(),
                "unmasked_loss_abs_diff": abs(loss_value.item() - call_loss(reference.loss, fq, fp, fn,
                                                                            teacher=full_teacher).loss.item()),
                "teacher_part": max((out.parts[k].item() for k in ("distill", "soft_labels") if k in out.parts),
                                    default=0.0),
            }
        dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out_path: str) -> int:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(free_port(), out_path), nprocs=WORLD, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
