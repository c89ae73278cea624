"""The inference engine: many ``Item``s -> their embeddings, in input order, with little padding.

Every inference path goes through ``encode_in_order``: ``Encoder.encode`` / ``encode_items`` (so
``embedkit.load(...).encode``, ``embedkit encode``, ``embedkit mine``), evaluation's ``encode_keys``
and the validation callback.

1. **Cost.** Each item's exact processed length comes from the backbone's own processor
   (``ChunkProcessor.costs``: text tokens plus image tokens by arithmetic on the image size), the
   count training's cost-aware chunking uses (``data/batch.py``). Costs are asked in blocks of
   ``COST_BLOCK`` items, through ``sized(i)`` where the sequence has it (``LazyItems``: an item whose
   image is opened for its size only, not decoded), so a corpus is never held decoded to be sorted:
   PIL reads the size from the file's header.
2. **Plan.** Items are ordered by decreasing cost (ties keep input order) and cut into batches of at
   most ``batch_size`` items and, with ``batch_tokens``, at most that many padded tokens (items x the
   batch's longest; an item over the budget goes alone). ``sort=False`` cuts in input order.
3. **Process.** A ``torch.utils.data.DataLoader`` over the planned batches: its collate function
   takes a batch's items (decoding an image happens here, in ``LazyItems.__getitem__``) and runs the
   processor, in ``num_workers`` worker processes when asked, so the model does not wait on
   tokenisation or image decoding. On CUDA the processed tensors are pinned by the loader and copied
   with ``non_blocking=True``.
4. **Forward** under ``torch.inference_mode``, in the model's own dtype (load the model in bfloat16,
   ``embedkit.load(..., dtype="bfloat16")``, to run it so; the backbones cast pixels to it).
5. **Restore.** Each batch's rows are put back at their input positions. Token sets of a multi-vector
   head whose length differs between batches are zero-padded to the longest (a zero vector is
   padding, ``losses.similarity.token_mask``).

An embedding never depends on what else is in its batch (the pooling contract), so the order and the
batch composition the engine chooses do not change the result (``tests/test_inference.py``: <= 1e-6
against one-at-a-time encoding, every family, text, images and token sets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from embedkit.data.batch import chunked, chunked_by_tokens, cost_order, pad_counts
from embedkit.data.schema import Item
from embedkit.distributed.ranks import gather_in_order, rank_and_world, shard_bounds
from embedkit.errors import UserError

#: items per ``processor.costs`` call while costing a corpus (bounds what is held at once)
COST_BLOCK = 512


@dataclass(frozen=True)
class Batching:
    """How the engine cuts a corpus into forward passes.

    ``batch_size``: items per forward pass (sentence-transformers' word for a chunk). ``batch_tokens``:
    padded tokens per forward pass, items x the longest (0: no budget). ``sort``: order by exact token
    cost first (False: input order). ``num_workers``: DataLoader worker processes that process the
    batches (0: in this process)."""

    batch_size: int = 32
    batch_tokens: int = 0
    sort: bool = True
    num_workers: int = 0

    def __post_init__(self):
        for name, least in (("batch_size", 1), ("batch_tokens", 0), ("num_workers", 0)):
            if getattr(self, name) < least:
                raise ValueError(f"{name}: must be >= {least}, got {getattr(self, name)}")


@dataclass
class EncodeStats:
    """What one ``encode_in_order`` did: items, forward passes, and the sequence slots of those passes
    (items x longest, summed) with the real tokens among them."""

    items: int = 0
    batches: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0

    @property
    def pad_fraction(self) -> float:
        """Padding's share of the sequence slots (0 when nothing was encoded)."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


class LazyItems(Sequence):
    """A sequence of items made on demand: ``self[i]`` is the ``Item`` ready to process (its image
    decoded), made where the batch is processed (a loader worker when ``num_workers`` > 0);
    ``sized(i)`` an ``Item`` whose image need only know its size (what ``costs`` reads). Subclasses
    define ``__len__``, ``__getitem__`` (an int index) and, to avoid decoding for costs, ``sized``.
    Picklable when its fields are (workers receive a copy)."""

    def sized(self, i: int) -> Item:
        return self[i]


def item_costs(items: Sequence[Item], processor) -> list[int]:
    """Each item's processed length, asked of ``processor.costs`` in blocks of ``COST_BLOCK``."""
    sized = getattr(items, "sized", items.__getitem__)
    costs: list[int] = []
    for start in range(0, len(items), COST_BLOCK):
        costs += processor.costs([sized(i) for i in range(start, min(start + COST_BLOCK, len(items)))])
    return costs


def plan_batches(costs: list[int] | None, n: int, batching: Batching) -> list[list[int]]:
    """Index lists, one per forward pass (see the module docstring, step 2). ``costs`` may be None only
    when neither sorting nor a token budget needs them."""
    order = cost_order(costs) if batching.sort else list(range(n))
    if not batching.batch_tokens:
        return chunked(order, batching.batch_size)
    return chunked_by_tokens(order, [costs[i] for i in order], batching.batch_size, batching.batch_tokens)


class ProcessBatch:
    """The loader's collate function: a batch's indices -> (indices, the processed inputs). Picklable.

    A ``UserError`` (an image not found, an image item for a text model) comes back as the value and is
    raised in the main process as it is: a loader worker would wrap it in its traceback, and the user's
    one-line error would become a page (docs/bugs-and-fixes.md)."""

    def __init__(self, items: Sequence[Item], processor):
        self.items, self.processor = items, processor

    def __call__(self, indices: list[int]) -> tuple[list[int], dict | UserError]:
        try:
            return indices, self.processor([self.items[i] for i in indices])
        except UserError as exc:
            return indices, exc


def to_device(inputs: dict, device: torch.device) -> dict:
    """Tensors onto ``device`` (non-blocking from pinned memory on CUDA); anything else as it is."""
    blocking = device.type != "cuda"
    return {k: v.to(device, non_blocking=not blocking) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}


def encode_in_order(
    items: Sequence[Item],
    forward: Callable[[dict], torch.Tensor],
    processor,
    batching: Batching = Batching(),
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor | None, EncodeStats]:
    """(embeddings of ``items`` in input order, on the CPU; None when there are none, stats).

    ``forward(processed inputs on device) -> [n, ...]`` embeds one batch; ``processor`` is the
    backbone's ``ChunkProcessor``; ``progress(done, total)`` is called after every forward pass."""
    device, n = torch.device(device), len(items)
    stats = EncodeStats(items=n)
    if n == 0:
        return None, stats
    costs = item_costs(items, processor) if batching.sort or batching.batch_tokens else None
    batches = plan_batches(costs, n, batching)
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=False, collate_fn=ProcessBatch(items, processor),
        num_workers=batching.num_workers, pin_memory=device.type == "cuda")
    parts, order = [], []
    for indices, inputs in loader:
        if isinstance(inputs, UserError):
            raise inputs
        padded, real = pad_counts([inputs])
        stats.padded_tokens, stats.real_tokens = stats.padded_tokens + padded, stats.real_tokens + real
        with torch.inference_mode():
            emb = forward(to_device(inputs, device))
        parts.append(emb.cpu())
        order += indices
        stats.batches += 1
        if progress is not None:
            progress(len(order), n)
    return in_input_order(parts, order), stats


def in_input_order(parts: list[torch.Tensor], order: list[int]) -> torch.Tensor:
    """The rows of ``parts`` (concatenated, row j is input ``order[j]``) at their input positions.
    Trailing dims that differ between parts (token sets of different lengths) are zero-padded."""
    tail = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        widths = [w for d in reversed(range(1, p.dim())) for w in (0, tail[d - 1] - p.shape[d])]
        padded.append(F.pad(p, widths) if any(widths) else p)
    rows = torch.cat(padded)
    out = torch.empty_like(rows)
    out[torch.tensor(order)] = rows
    return out


def encode_split(n: int, encode_share: Callable[[int, int], torch.Tensor]) -> torch.Tensor | None:
    """Embeddings of ``n`` items, split across the ranks of a process group: this rank embeds its
    contiguous share ``encode_share(start, stop)`` (``distributed.ranks.shard_bounds``), and the shares
    are gathered in rank order, so every rank returns all ``n`` rows in input order, as one process
    would (the engine's results do not depend on the batches). Without a group: ``encode_share(0, n)``.
    None when ``n`` is 0."""
    rank, world = rank_and_world()
    start, stop = shard_bounds(n, rank, world)
    local = encode_share(start, stop) if stop > start else None
    if local is not None and local.shape[0] != stop - start:
        raise RuntimeError(f"encode returned {local.shape[0]} embeddings for {stop - start} items")
    return gather_in_order(local)


class ItemSlice(LazyItems):
    """``items[start:stop]`` of a ``LazyItems`` as a ``LazyItems`` (a rank's share), nothing made ahead."""

    def __init__(self, items: Sequence[Item], start: int, stop: int):
        self.items, self.start, self.stop = items, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def _at(self, i: int) -> int:
        if not 0 <= i < len(self):  # iteration stops here, not at the end of the whole sequence
            raise IndexError(i)
        return self.start + i

    def __getitem__(self, i: int) -> Item:
        return self.items[self._at(i)]

    def sized(self, i: int) -> Item:
        return getattr(self.items, "sized", self.items.__getitem__)(self._at(i))


def encode_shared(items: Sequence[Item], encode: Callable[[Sequence[Item]], torch.Tensor]) -> torch.Tensor:
    """Embeddings ``[len(items), D]`` (float32, CPU) of every item: each rank encodes its share in one
    ``encode`` call (``ItemSlice``) and the shares are gathered (``encode_split``); ``[0, 0]`` when empty."""

    def share(start: int, stop: int) -> torch.Tensor:
        with torch.no_grad():
            return encode(ItemSlice(items, start, stop)).detach().float().cpu()

    out = encode_split(len(items), share)
    return out if out is not None else torch.empty(0, 0)
