"""Where this process stands among the ranks, and the one reduction the trainer's decisions need.

``process_group_up()``: a ``torch.distributed`` process group exists (it may hold one process).
``rank_and_world()``: (rank, world size), (0, 1) without a group. ``is_distributed()``: several
processes. ``max_over_ranks(t)``: the elementwise maximum of ``t`` over all ranks, on ``t``'s device
(no host sync); ``all_max(value, device)``: the same for one integer, read back to the host. Ranks
agree on a flag (a signal received, a non-finite step, a forward-pass count) by taking its maximum.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def process_group_up() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) outside a process group."""
    if process_group_up():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return rank_and_world()[1] > 1


def max_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` reduced by elementwise maximum over all ranks (in place; ``t`` itself without a group).
    Under NCCL ``t`` must be on the rank's device."""
    if process_group_up():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed elementwise over all ranks (in place; ``t`` itself without a group).
    Under NCCL ``t`` must be on the rank's device."""
    if process_group_up():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(value: int, device) -> int:
    """The largest ``value`` over all ranks (the value itself when not distributed)."""
    if not process_group_up():
        return int(value)
    return int(max_over_ranks(torch.tensor([int(value)], dtype=torch.int64, device=device)).item())
