"""Counting the operations that make the host wait for the device.

On a GPU the host queues kernels and runs ahead; an operation that needs a device value on the host
drains the queue and leaves the GPU idle while Python catches up: a read of a tensor's value
(``item``, ``bool``, ``int``, ``float``, ``tolist``, ``cpu``, ``numpy``), an op whose output shape
depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``,
``repeat_interleave`` with tensor repeats). ``torch.cuda.set_sync_debug_mode`` flags them on a GPU;
``SyncCounter`` counts the same operations on any device -- on a CPU they cost nothing, which is
why they go unnoticed there -- with the call site of each, so that a CPU test can bound them.

On a CPU every tensor is a host tensor, so a read of a tensor that stays on the host on a GPU too
(the optimizer's step counters, the RNG states, what the DataLoader made) counts as well: the sites
tell them apart, and ``HOST_SIDE`` names the ones that never touch a device tensor.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: ops that read a value back or size their output from the data (a device->host sync on a GPU)
_ALWAYS = {
    aten._local_scalar_dense.default,  # item(), bool(), int(), float(), __index__
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
#: Python-level reads that do not go through the dispatcher for a host tensor
_METHODS = ("tolist", "cpu", "numpy")
#: call sites whose reads are of host tensors on a GPU too (torch.optim's step counters are CPU
#: tensors unless ``capturable``)
HOST_SIDE = ("torch/optim/",)
#: frames skipped when naming a call site: the counter and torch's own plumbing
_PLUMBING = ("torch/_tensor.py", "torch/utils/_python_dispatch.py", "torch/_ops.py", "torch/overrides.py",
             "torch/utils/_contextlib.py", "bench/host_sync.py", "torch/functional.py",
             "torch/_dynamo/", "torch/_compile.py")


def _syncs(func, args, kwargs) -> bool:
    if func in _ALWAYS:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in _INDEXING:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    return False


def call_site() -> str:
    """``path:line (function)`` of the innermost frame outside the counter and torch's plumbing."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if not any(p in name for p in _PLUMBING):
            parts = Path(name).parts
            for root in ("embedkit", "transformers", "lightning", "torch", "peft", "bench", "tests"):
                if root in parts:
                    name = "/".join(parts[len(parts) - 1 - parts[::-1].index(root):])
                    break
            return f"{name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


class SyncCounter(TorchDispatchMode):
    """Context manager: counts host-synchronising operations (see the module docstring) by call site.

    ``counts`` maps ``site -> calls``; ``total(exclude=HOST_SIDE)`` sums the sites outside the given
    path fragments. Nesting-safe; Python methods are patched only while it is active.
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self._saved: dict = {}
        self._busy = False

    def _note(self) -> None:
        if not self._busy:
            self._busy = True
            try:
                self.counts[call_site()] += 1
            finally:
                self._busy = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self._note()
        return func(*args, **kwargs)

    def __enter__(self):
        for name in _METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, __original=original, **kwargs):
                self._note()
                return __original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)
            self._saved = {}

    def total(self, exclude: tuple[str, ...] = HOST_SIDE) -> int:
        return sum(n for site, n in self.counts.items() if not any(e in site for e in exclude))

    def report(self, steps: int = 1, top: int = 15, exclude: tuple[str, ...] = HOST_SIDE) -> str:
        """Lines: calls per step by site, most frequent first (host-side sites marked)."""
        lines = []
        for site, n in self.counts.most_common(top):
            tag = "  [host tensor]" if any(e in site for e in exclude) else ""
            lines.append(f"  {n / steps:8.1f}  {site}{tag}")
        return "\n".join(lines)
