"""Where this process stands among the ranks, and the one reduction the trainer's decisions need.

``process_group_up()``: a ``torch.distributed`` process group exists (it may hold one process).
``rank_and_world()``: (rank, world size), (0, 1) without a group. ``is_distributed()``: several
processes. ``max_over_ranks(t)``: the elementwise maximum of ``t`` over all ranks, on ``t``'s device
(no host sync); ``all_max(value, device)``: the same for one integer, read back to the host. Ranks
agree on a flag (a signal received, a non-finite step, a forward-pass count) by taking its maximum.

The inference verbs (``eval``, ``encode``, ``mine``) under ``torchrun``: ``join_launched_group()``
joins the group the launcher describes, ``shard_bounds`` gives each rank its contiguous share of a
corpus, ``gather_in_order`` puts the shares back together on every rank, ``barrier()`` waits for all,
``leave_group()`` leaves.
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


def join_launched_group() -> bool:
    """Join the process group a launcher (``torchrun``) describes in the environment, when it names more
    than one process and no group exists yet: NCCL on CUDA (device ``LOCAL_RANK``), gloo on the CPU.
    True when this call created the group (its caller leaves it: ``leave_group``)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or process_group_up():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def barrier() -> None:
    """Wait for every rank (nothing without a group)."""
    if process_group_up():
        dist.barrier()


def leave_group() -> None:
    """Wait for every rank, then leave the process group (if one was joined)."""
    if process_group_up():
        dist.barrier()
        dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous share ``[start, stop)`` of ``n`` items for ``rank`` (sizes differ by at most 1)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a group."""
    if not process_group_up():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_in_order(local: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's ``local`` rows (its share; None for an empty one), concatenated in rank order, on
    every rank (CPU tensors, through ``all_gather_object``); ``local`` itself without a group."""
    if not is_distributed():
        return local
    shares = [g for g in all_objects(local) if g is not None]
    return torch.cat(shares) if shares else None


def rank_logger():
    """A progress printer (flushed); under several processes each line starts with ``[rank/world]``."""
    rank, world = rank_and_world()
    prefix = f"[{rank}/{world}] " if world > 1 else ""
    return lambda message: print(prefix + message, flush=True)


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
