"""2-process CPU DDP (gloo, 127.0.0.1): gradients with cross-device negatives == single-process.

    python tests/scripts/ddp_loss_grad.py OUT.json

A small encoder (nn.Linear + L2 normalise) is trained one step with each loss on a global batch of
W*b examples with K hard negatives each. Each rank encodes its b examples, calls
``embedkit.distributed.distributed_loss`` and backpropagates under DistributedDataParallel (which
averages gradients). Rank 0 also computes the single-process full-batch gradient and writes, per
loss, the largest gradient difference, the loss-value difference and whether the gathered batch
equals the full batch. A deliberately wrong variant (gather without gradients) is included so the
check is shown to be able to fail.
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
}


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
    def __init__(self, loss: nn.Module):
        super().__init__()
        self.encoder = nn.Linear(D_IN, D)
        self.loss = loss  # a submodule, as in the LightningModule: DDP syncs a learnable τ too

    def forward(self, x):
        return F.normalize(self.encoder(x), dim=-1)


def build_loss(block):
    from embedkit.config import registry, schema

    if block is None:
        return Rowless()
    return registry.build("loss", schema._component("loss", block, "infonce", "loss"), embedding_dim=D)


def global_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    n = WORLD * B_LOCAL
    return (torch.randn(n, D_IN, generator=g, dtype=torch.float64),
            torch.randn(n, D_IN, generator=g, dtype=torch.float64),
            torch.randn(n, K, D_IN, generator=g, dtype=torch.float64))


def encode(model, xq, xp, xn):
    b = xq.shape[0]
    e = model(torch.cat([xq, xp, xn.reshape(-1, D_IN)]))
    return e[:b], e[b : 2 * b], e[2 * b :].reshape(b, K, D)


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

    results = {}
    own = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    variants = [(name, name, False) for name in LOSSES] + [("detached_gather_bug", "hardness_weighted", True)]
    for i, (label, loss_name, buggy) in enumerate(variants):
        torch.manual_seed(i)
        model = Model(build_loss(LOSSES[loss_name])).double()
        reference = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        xq, xp, xn = global_batch(seed=100 + i)
        q, p, n = encode(ddp, xq[own], xp[own], xn[own])
        out = (detached_gather_loss if buggy else distributed_loss)(model.loss, q, p, n)
        out.loss.backward()
        loss_value = out.loss.detach().clone()
        dist.all_reduce(loss_value)
        loss_value /= WORLD
        with torch.no_grad():
            Q, P, N, rows = gather_batch(q, p, n)
        if rank == 0:
            fq, fp, fn = encode(reference, xq, xp, xn)
            full = reference.loss(fq, fp, fn)
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
