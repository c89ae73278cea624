"""All-gather of embeddings across ranks WITH gradients (torch.distributed; gloo on CPU, NCCL on GPU).

``all_gather_with_grad(x [b, ...]) -> [W*b, ...]``: every rank's ``x`` concatenated in rank order.
Forward: ``all_gather``. Backward: the gradient w.r.t. the gathered tensor is SUMMED over ranks
(``all_reduce``) and each rank keeps its own slice, because every rank's loss may depend on every
rank's embeddings: d(Σ_r L_r)/dx_own = Σ_r dL_r/dx_own.

Every rank must call it with the same shape (the per-rank batch is fixed in embedkit) and must run
the backward through it (the backward is a collective, like the forward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from embedkit.distributed.ranks import is_distributed


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[0]
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x, group=group)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """``x`` of every rank, concatenated along dim 0 in rank order; gradients flow back to each rank."""
    if not is_distributed():
        return x
    return _AllGather.apply(x, group)
