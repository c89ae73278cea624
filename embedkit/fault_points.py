"""Named fault points: places in the code where a test (``bench/faults.py``) can kill the process or
make a write fail, to prove that each fault ends in an exact resume or one clear line.

``fault_point(name)`` is a no-op unless the environment names the point:

    EMBEDKIT_FAULT_PLAN="checkpoint_write:3"          SIGKILL this process the 3rd time it is reached
    EMBEDKIT_FAULT_PLAN="checkpoint_write:2:enospc"   raise OSError(ENOSPC) there (a full disk)
    EMBEDKIT_FAULT_PLAN="train_batch:7,encode_part:1"  several entries, comma-separated
    EMBEDKIT_FAULT_TRACE=FILE                         append each point's name to FILE as it is reached

The plan is parsed once per value of the variable; with neither variable set a call costs one
environment lookup. The points (docs/faults.md): ``checkpoint_write`` (the temporary is written, before
the rename), ``train_batch`` (after a training batch), ``validation_batch``, ``encode_part`` (a part's
temporary written, before its rename), ``mine_cache`` (a subset's embeddings cached),
``mine_shard`` (a mined shard written, before its counts), ``eval_dataset`` (a dataset scored),
``teach_shard`` (a taught shard written, before its counts).
"""

from __future__ import annotations

import errno
import functools
import os
import signal

PLAN_ENV = "EMBEDKIT_FAULT_PLAN"
TRACE_ENV = "EMBEDKIT_FAULT_TRACE"
POINTS = ("checkpoint_write", "train_batch", "validation_batch", "encode_part", "mine_cache", "mine_shard",
          "eval_dataset")
POINTS += ("teach_shard",)  # a taught shard written, before its counts (mining/teacher.py)
ACTIONS = ("kill", "enospc")


class Plan:
    """{point: (the reach that acts, 1-based; the action)} and how often each point was reached."""

    def __init__(self, entries: dict[str, tuple[int, str]]):
        self.entries = entries
        self.reached: dict[str, int] = {}

    def hit(self, name: str) -> str | None:
        """Count one reach of ``name``; the action due at this reach, if any."""
        if name not in self.entries:
            return None
        self.reached[name] = self.reached.get(name, 0) + 1
        at, action = self.entries[name]
        return action if self.reached[name] == at else None


def parse_plan(text: str) -> Plan:
    """``point:count[:action],...`` -> ``Plan``; ValueError naming a malformed entry."""
    entries = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, _, rest = entry.partition(":")
        count, _, action = rest.partition(":")
        action = action or "kill"
        if name not in POINTS or not count.isdigit() or int(count) < 1 or action not in ACTIONS:
            raise ValueError(f"{PLAN_ENV}: bad entry {entry!r}; expected POINT:COUNT[:ACTION] with POINT one of "
                             f"{', '.join(POINTS)}, COUNT >= 1, ACTION one of {', '.join(ACTIONS)}")
        entries[name] = (int(count), action)
    return Plan(entries)


@functools.lru_cache(maxsize=4)
def _plan(text: str) -> Plan:
    return parse_plan(text)


def reset() -> None:
    """Forget every plan's reach counts (a test that runs the same plan twice in one process)."""
    _plan.cache_clear()


def fault_point(name: str) -> None:
    """Reached ``name``: act if the plan says so (SIGKILL; or raise ``OSError(ENOSPC)``), else nothing."""
    text, trace = os.environ.get(PLAN_ENV), os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a") as f:
            f.write(name + "\n")
    if not text:
        return
    action = _plan(text).hit(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {name})")
