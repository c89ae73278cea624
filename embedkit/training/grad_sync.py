"""Gradient synchronisation for GradCache steps under DDP and FSDP2: once per optimizer step.

A GradCache step runs many backward passes (the cache's loss backward, then one per chunk); under
accumulation, several steps' worth. Letting the data-parallel machinery reduce gradients on each of
them is wasteful at best and, under Lightning, WRONG for DDP: Lightning's training_step runs inside
the DDP wrapper's forward (which prepares the reducer for ONE backward), and in manual optimization
``DDPStrategy.pre_backward`` prepares it again before each ``manual_backward`` unless the wrapper's
``require_backward_grad_sync`` is False. Wrapping the chunk backwards in ``no_sync()`` alone leaves
those preparations in place (see docs/bugs-and-fixes.md, "GradCache under Lightning DDP").

The pattern here:

- DDP: ``require_backward_grad_sync = False`` on the wrapper for the whole run (set before every
  training batch, so neither the wrapper's forward nor ``pre_backward`` touches the reducer); the
  module then averages every ``.grad`` over ranks itself, ONCE, just before clipping (SUM / world:
  the convention of embedkit/distributed/loss.py, which makes the average the full-batch gradient).
- FSDP2 (``fully_shard``): ``set_requires_gradient_sync(False)`` for every backward but the last of
  an optimizer step; the last one reduce-scatters the accumulated unsharded gradients (averaged
  over the data-parallel mesh by FSDP2 itself).
- Anything else (one device): nothing to do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from embedkit.distributed.ranks import process_group_up


def ddp_wrapper(strategy) -> nn.Module | None:
    """The ``DistributedDataParallel`` wrapper a Lightning strategy trains through, if any."""
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(strategy, "model", None)
    return model if isinstance(model, DistributedDataParallel) else None


def fsdp2_roots(module: nn.Module) -> list[nn.Module]:
    """Modules of ``module`` (itself included) that ``fully_shard`` turned into FSDP2 modules."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def keep_reducer_out(strategy) -> None:
    """DDP: the reducer takes no part in any backward; gradients are averaged by ``average_gradients``."""
    wrapper = ddp_wrapper(strategy)
    if wrapper is not None:
        wrapper.require_backward_grad_sync = False


def set_fsdp_sync(module: nn.Module, enabled: bool) -> None:
    for m in fsdp2_roots(module):
        m.set_requires_gradient_sync(enabled, recurse=False)


@torch.no_grad()
def average_gradients(params: list[nn.Parameter], group=None) -> None:
    """All-reduce (SUM / world) of every trainable parameter's ``.grad``, one flat buffer per dtype.

    A parameter that got no gradient on some ranks (e.g. the vision tower when a rank's batch holds
    no image) gets zeros there if any rank has a gradient for it, so every rank reduces the same
    list of tensors in the same order.
    """
    if not process_group_up() or dist.get_world_size(group) == 1:
        return
    world = dist.get_world_size(group)
    params = [p for p in params if p.requires_grad]
    # on the parameters' device: NCCL reduces device tensors only (a CPU tensor works under gloo alone);
    # the copy does not wait, the .tolist() is this function's one host sync
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
    has = has.to(params[0].device, non_blocking=True) if params else has
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
    for p, flag in zip(params, has.tolist()):
        if flag and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    for group_grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group_grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= world
        offset = 0
        for g in group_grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
