"""Streaming training batches from shards: subsets mixed by weight, task-homogeneous sub-batches,
split by rank and worker, processed per chunk inside the DataLoader workers.

A *source* is one folder of shards (an MMEB subset after ``embedkit data mmeb``; the demo is one
source). ``ShardStream`` is an IterableDataset; every (rank, worker) pair is a *reader slot* and
reads a disjoint share of every source: its own shards when a source has at least as many shards as
there are slots, else every ``slots``-th sample of each shard. Shards are resampled (a fresh seeded
permutation per pass) so a source never runs dry, and samples are shuffled per window of raw
samples (raw bytes; decoding happens when a sample is drawn, so the window stays cheap). Every
pass order and window permutation is seeded by its own index, so a resumed run starts the stream
at its step (``start_step``) without decoding, or even reading, what came before.

Batches are made by *step*, not by reader: worker ``w`` of ``W`` builds the steps ``s`` with
``s % W == w`` (the DataLoader takes workers round-robin, so batch ``s`` of every rank comes from
step ``s``). A local batch of ``B`` examples is ``B / task_batch_size`` sub-batches; the source of
sub-batch ``j`` at step ``s`` is drawn from the mixture weights by an RNG seeded with
``(seed, s, j)`` only -- the same source on every rank, so gathered negatives come from one task
(VLM2Vec/LLaVE task-homogeneous batching). ``task_batch_size=0`` draws each example's source
independently (fully mixed). ``epoch_steps`` > 0 gives every rank exactly that many batches per
epoch (``len()`` of the stream); 0 is endless (the run length is ``trainer.max_steps``). Either way,
every rank yields the same number of full batches, so DDP never waits on a rank that ran dry.

A sample that fails to decode (a corrupt image, a missing part) or a truncated tar is skipped,
counted and logged, and the batch is filled from the next sample: batches are always full. Shards
may be URLs or ``pipe:`` commands (``embedkit.data.remote``): a dropped connection is resumed
below the tar reader, so the stream is the same as over local copies; a remote shard that cannot
be had after the retries stops the run with ``ShardUnavailable`` (one line naming the URL).
Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from embedkit.data.remote import ShardUnavailable
from embedkit.data.schema import Example, Item
from embedkit.data.shards import decode_sample, iter_samples

log = logging.getLogger(__name__)


@dataclass
class TrainBatch:
    """One device's share of a contrastive batch, already processed into model inputs.

    With cost-aware chunking (``ChunkCollate(sort=True)``) the chunks hold each side's items in
    another order than the batch's; ``query_restore`` / ``candidate_restore`` index the concatenated
    chunk embeddings back into batch order (row ``i`` of the side is encoded row ``restore[i]``),
    None when the chunks keep the batch order. ``padded_tokens`` / ``real_tokens``: sequence slots
    in the forward passes (items x longest, summed over chunks) and the real tokens among them.
    """

    query_chunks: list[dict]  # processed chunks of the B queries
    candidate_chunks: list[dict]  # processed chunks of the B positives, then B*K negatives (example-major)
    batch_size: int  # B
    num_negatives: int  # K
    tasks: list[str]
    query_restore: torch.Tensor | None = None  # [B] long: batch row -> encoded row; None: in order
    candidate_restore: torch.Tensor | None = None  # [B*(1+K)] long, likewise
    padded_tokens: int = 0
    real_tokens: int = 0

    @property
    def pad_fraction(self) -> float:
        """Padding's share of the sequence slots of this batch's forward passes (0 when unknown)."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def chunked(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def chunked_by_tokens(items: list, lengths: list[int], size: int, budget: int) -> list[list]:
    """Contiguous chunks of at most ``size`` items and ``budget`` padded tokens (items x longest).

    Order is kept (the loss pairs rows by position). An item longer than the budget alone gets a
    chunk of its own: it cannot be split.
    """
    chunks, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        grown = max(longest, n)
        if i > start and (i - start + 1 > size or (i - start + 1) * grown > budget):
            chunks.append(items[start:i])
            start, grown = i, n
        longest = grown
    if items:
        chunks.append(items[start:])
    return chunks


def cost_order(costs: list[int]) -> list[int]:
    """Indices by decreasing cost; ties keep their batch order (deterministic)."""
    return sorted(range(len(costs)), key=lambda i: (-costs[i], i))


def packed_by_tokens(costs: list[int], size: int, budget: int) -> list[list[int]]:
    """First-fit decreasing: item indices, most costly first, each into the first chunk that still
    holds it (at most ``size`` items and ``budget`` padded tokens, i.e. items x the chunk's longest,
    its first item). An item over the budget gets a chunk of its own. Returns index lists."""
    chunks: list[list[int]] = []
    for i in cost_order(costs):
        for chunk in chunks:
            if len(chunk) < size and (len(chunk) + 1) * costs[chunk[0]] <= budget:
                chunk.append(i)
                break
        else:
            chunks.append([i])
    return chunks


class ChunkCollate:
    """Examples -> TrainBatch: lays out candidates, splits into chunks, runs the backbone processor.

    ``sort`` (``train.sort_chunks``): each side (the queries; the candidates: positives and every
    negative slot, one pool) is ordered by cost -- the processed length, text plus image tokens,
    from ``processor.num_tokens`` (each backbone's arithmetic, no second processing) -- before it is
    cut, so a chunk holds items of like length and pads little; with ``chunk_tokens`` the chunks are
    packed first-fit decreasing under the token budget. The embeddings are put back in batch order
    by ``TrainBatch.*_restore`` before the loss. ``sort=False`` cuts in arrival order.
    """

    def __init__(self, processor, chunk_size: int, num_negatives: int, chunk_tokens: int = 0, sort: bool = False):
        self.processor = processor
        self.chunk_size = chunk_size
        self.num_negatives = num_negatives
        self.chunk_tokens = chunk_tokens
        self.sort = sort

    def split(self, items: list[Item]) -> list[list[Item]]:
        """Arrival-order chunks (``sort=False``'s layout)."""
        if not self.chunk_tokens:
            return chunked(items, self.chunk_size)
        lengths = [self.processor.num_tokens(it) for it in items]
        return chunked_by_tokens(items, lengths, self.chunk_size, self.chunk_tokens)

    def layout(self, items: list[Item]) -> tuple[list[list[Item]], torch.Tensor | None]:
        """(chunks, restore): ``restore`` maps batch rows to rows of the concatenated chunks (None: in order)."""
        if not self.sort or len(items) < 2:
            return self.split(items), None
        costs = self.processor.costs(items) if hasattr(self.processor, "costs") else [
            self.processor.num_tokens(it) for it in items]
        if self.chunk_tokens:
            groups = packed_by_tokens(costs, self.chunk_size, self.chunk_tokens)
        else:
            groups = chunked(cost_order(costs), self.chunk_size)
        order = [i for g in groups for i in g]
        restore = torch.empty(len(order), dtype=torch.long)
        restore[torch.tensor(order)] = torch.arange(len(order))
        return [[items[i] for i in g] for g in groups], restore

    def __call__(self, examples: list[Example]) -> TrainBatch:
        queries = [ex.query for ex in examples]
        cands = [ex.positive for ex in examples]
        cands += [n for i in range(len(examples)) for n in self.negatives(i, examples)]
        query_groups, query_restore = self.layout(queries)
        cand_groups, cand_restore = self.layout(cands)
        query_chunks = [self.processor(c) for c in query_groups]
        candidate_chunks = [self.processor(c) for c in cand_groups]
        padded, real = pad_counts(query_chunks + candidate_chunks)
        return TrainBatch(
            query_chunks=query_chunks,
            candidate_chunks=candidate_chunks,
            batch_size=len(examples),
            num_negatives=self.num_negatives,
            tasks=[ex.task for ex in examples],
            query_restore=query_restore,
            candidate_restore=cand_restore,
            padded_tokens=padded,
            real_tokens=real,
        )

    def negatives(self, i: int, examples: list[Example]) -> list[Item]:
        """Exactly K negatives for example i: its own, cycled; an example with none (most MMEB
        subsets) borrows the positives of the other examples of its batch, which are true
        in-batch negatives of its query."""
        k, ex = self.num_negatives, examples[i]
        if k == 0:
            return []
        if ex.negatives:
            return [ex.negatives[j % len(ex.negatives)] for j in range(k)]
        others = [e.positive for j, e in enumerate(examples) if j != i]
        if not others:
            raise ValueError(f"data.train.num_negatives={k} but an example of task {ex.task!r} has none "
                             "and its batch has no other example to borrow from")
        return [others[(i + j) % len(others)] for j in range(k)]


def pad_counts(chunks: list[dict]) -> tuple[int, int]:
    """(sequence slots, real tokens) over processed chunks, from their attention masks."""
    padded = real = 0
    for chunk in chunks:
        mask = chunk.get("attention_mask") if isinstance(chunk, dict) else None
        if mask is not None:
            padded += mask.numel()
            real += int(mask.sum())
    return padded, real


# -- sources and weights ------------------------------------------------------------------------
def group_shards(shards: list[str]) -> dict[str, list[str]]:
    """Source name (the shard's folder name) -> its shards, sorted."""
    by_dir: dict[Path, list[str]] = {}
    for s in shards:
        by_dir.setdefault(Path(s).parent, []).append(str(s))
    names = [d.name or str(d) for d in by_dir]
    unique = len(set(names)) == len(names)
    return {(d.name or str(d)) if unique else str(d): sorted(v) for d, v in sorted(by_dir.items())}


def source_weights(sources: dict[str, list[str]], mix: dict | None = None) -> dict[str, float]:
    """Mixture weights: ``mix`` where given, else the source's example count from the conversion
    manifest (``<root>/manifest.json``), else its number of shards. Weight 0 leaves a source out."""
    mix = dict(mix or {})
    unknown = sorted(set(mix) - set(sources))
    if unknown:
        raise ValueError(f"data.train.mix: unknown subset(s) {', '.join(unknown)}; sources: {', '.join(sources)}")
    counts: dict[str, float] = {}
    for name, shards in sources.items():
        manifest = Path(shards[0]).parent.parent / "manifest.json"
        count = None
        if manifest.is_file():
            entry = json.loads(manifest.read_text()).get("subsets", {}).get(Path(shards[0]).parent.name)
            count = entry and entry.get("count")
        counts[name] = float(count or len(shards))
    weights = {n: float(mix.get(n, counts[n])) for n in sources}
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"data.train.mix: weights must be >= 0 with one > 0, got {weights}")
    return {n: w for n, w in weights.items() if w > 0}


def count_samples(path: str) -> int:
    """Samples in a tar shard as ``iter_samples`` yields them, from the member headers only (the
    data is seeked over, never read): what lets a reader skip whole shards on resume."""
    n, key = 0, None
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if member.isfile():
                    k = os.path.basename(member.name).split(".", 1)[0]
                    if k != key:
                        n, key = n + 1, k
    except (tarfile.TarError, OSError):
        return max(0, n - 1)  # a cut tar: its last sample is never yielded
    return n


class _SourceReader:
    """Endless decoded examples of one source, for one reader slot (see the module docstring).

    The raw sample sequence is a series of *passes*; pass ``p`` reads this slot's share of the
    shards in an order drawn from ``(key, p)`` alone. Shuffling is by *window*: the raw samples
    ``[w * buffer, (w + 1) * buffer)`` are permuted by an RNG drawn from ``(key, w)`` alone. So the
    state after ``n`` examples is derivable without replaying them: ``start=n`` counts the shards'
    samples from their tar headers, skips whole passes and shards, and reads (without decoding) at
    most one shard and one window to land on sample ``n``.
    """

    def __init__(self, name: str, shards: list[str], slot: int, slots: int, key: str,
                 buffer: int, owner: "ShardStream", start: int = 0):
        self.name, self.shards, self.key, self.buffer_size, self.owner = name, shards, key, buffer, owner
        if len(shards) >= slots:
            self.mine, self.stride, self.offset = shards[slot::slots], 1, 0
        else:  # fewer shards than readers: split samples instead
            self.mine, self.stride, self.offset = shards, slots, slot
        self.window, skip = divmod(start, buffer)
        self.raw = self._raw(self.window * buffer)
        self.pending: list = []
        self._fill()
        del self.pending[len(self.pending) - skip:]  # pending is popped from the end

    def _share(self, shard: str) -> int:
        """How many of ``shard``'s samples this slot reads."""
        c = count_samples(shard)
        return max(0, -(-(c - self.offset) // self.stride)) if c > self.offset else 0

    def _seek(self, start: int) -> tuple[int, int, bool]:
        """(pass, raw samples to skip within it) of raw sample ``start``; falls back like ``_raw``."""
        counts = {s: self._share(s) for s in self.mine}
        first = 0
        if not sum(counts.values()):  # this slot's share is empty: the fallback after one empty pass
            self.mine, self.stride, self.offset = self.shards, 1, 0
            counts, first = {s: self._share(s) for s in self.mine}, 1
            if not sum(counts.values()):
                raise RuntimeError(f"training source {self.name!r} has no readable sample")
        p, rem = divmod(start, sum(counts.values()))
        self._counts = counts
        return first + p, rem, bool(first)

    def _raw(self, start: int = 0):
        fallback, p, rem = False, 0, 0
        if start:
            p, rem, fallback = self._seek(start)
        while True:
            got = 0
            for shard in random.Random(f"{self.key}-pass-{p}").sample(self.mine, len(self.mine)):
                if rem:
                    n = self._counts[shard]
                    if rem >= n:  # skip the whole shard: not even opened
                        rem -= n
                        got += n
                        continue
                try:
                    for i, (key, files) in enumerate(iter_samples(shard)):
                        if i % self.stride == self.offset:
                            got += 1
                            if rem:
                                rem -= 1
                                continue
                            yield shard, key, files
                except ShardUnavailable:  # a remote shard that cannot be had (retries spent): stop, say which
                    raise
                except Exception as exc:  # a truncated or unreadable tar: keep what was read, move on
                    self.owner.skip(f"the rest of {shard} ({exc})", shard)
            p += 1
            if got == 0:
                if fallback:
                    raise RuntimeError(f"training source {self.name!r} has no readable sample")
                log.warning("source %s: this reader's share is empty (fewer samples than readers); "
                            "reading all of it", self.name)
                self.mine, self.stride, self.offset, fallback = self.shards, 1, 0, True

    def _fill(self) -> None:
        """The next window of raw samples, permuted by its own RNG (popped from the end)."""
        window = [next(self.raw) for _ in range(self.buffer_size)]
        random.Random(f"{self.key}-window-{self.window}").shuffle(window)
        window.reverse()
        self.pending, self.window = window, self.window + 1

    def next(self) -> Example:
        while True:
            if not self.pending:
                self._fill()
            shard, key, files = self.pending.pop()
            try:
                return decode_sample(key, files)
            except Exception as exc:  # a corrupt image or a malformed sample: skip, count
                self.owner.skip(f"sample {key} in {shard} ({type(exc).__name__}: {exc})", f"{shard}#{key}")


class ShardStream(IterableDataset):
    def __init__(self, shards: list[str] | dict[str, list[str]], collate: ChunkCollate, local_batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                 mix: dict | None = None, task_batch_size: int = 0, epoch_steps: int = 0,
                 start_step: int = 0):
        self.sources = dict(shards) if isinstance(shards, dict) else group_shards(list(shards))
        self.weights = source_weights(self.sources, mix)
        w = np.array(list(self.weights.values()), dtype=np.float64)
        self._cum = np.cumsum(w) / w.sum()
        # a sub-batch larger than the device's batch means "the whole batch from one subset"
        task_batch_size = min(task_batch_size, local_batch_size)
        if task_batch_size < 0 or (task_batch_size and local_batch_size % task_batch_size):
            raise ValueError(f"data.train.task_batch_size={task_batch_size} must divide the per-device batch "
                             f"({local_batch_size} examples)")
        self.collate = collate
        self.local_batch_size = local_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.task_batch_size = task_batch_size
        self.epoch_steps = epoch_steps
        self.start_step = start_step  # resume: the first __iter__ starts at this step
        self.skipped = 0
        self._warned: set[str] = set()  # samples and shards already warned about
        self.epoch = -1  # counted per process: persistent workers keep their copy across epochs

    def __len__(self):
        if self.epoch_steps > 0:
            return self.epoch_steps
        raise TypeError("an endless stream has no length (data.train.epoch_steps=0)")

    def skip(self, what: str, where: str) -> None:
        """Count a skip; warn the first time a given sample or shard fails (resampling meets it again)."""
        self.skipped += 1
        level = logging.DEBUG if where in self._warned else logging.WARNING
        self._warned.add(where)
        log.log(level, "skipped %s; %d skipped so far on rank %d", what, self.skipped, self.rank)

    # -- the plan: which source feeds which example, by step --------------------------------
    def _draws(self, steps) -> "np.ndarray":
        """Source index of each draw at each of ``steps``: [len(steps), draws per step]. A draw is a
        pure function of (seed, step, j) -- and of the rank when fully mixed -- so any step's plan,
        or the counts of many steps, costs no history (vectorised: 10,000 steps in well under a ms)."""
        b, t = self.local_batch_size, self.task_batch_size
        steps = np.asarray(steps, dtype=np.uint64).reshape(-1, 1)
        j = np.arange(b // t if t else b, dtype=np.uint64).reshape(1, -1)
        tag = 0 if t else self.rank + 1  # task draws: the same subset on every rank
        with np.errstate(over="ignore"):
            x = (np.uint64(self.seed & _MASK) * _K1) ^ (np.uint64(tag) * _K2) ^ (steps * _K3) ^ (j * _K4)
            for shift, mult in ((30, _M1), (27, _M2)):  # splitmix64's finaliser
                x = (x ^ (x >> np.uint64(shift))) * mult
            x ^= x >> np.uint64(31)
        u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        return np.minimum(np.searchsorted(self._cum, u, side="right"), len(self._cum) - 1)

    def step_sources(self, step: int) -> list[str]:
        """The source of each example of this rank's batch at ``step``."""
        names, t = list(self.weights), self.task_batch_size
        return [names[i] for i in self._draws([step])[0] for _ in range(t or 1)]

    def drawn_before(self, steps) -> dict[str, int]:
        """Examples each source gives this rank over ``steps`` (the skipped steps of a resume)."""
        names, t = list(self.weights), self.task_batch_size
        if len(steps) == 0:
            return {}
        counts = np.bincount(self._draws(steps).ravel(), minlength=len(names)) * (t or 1)
        return {n: int(c) for n, c in zip(names, counts)}

    def batches(self, worker: int = 0, num_workers: int = 1, epoch: int = 0, start: int = 0):
        """The examples of each batch this (rank, worker) builds, in order (before collation), from
        step ``start`` on. Skipping costs the mixture draws of the skipped steps (a few seeded RNG
        calls each) and the readers' ``start``: no skipped sample is decoded."""
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        buffer = max(1, -(-self.shuffle_buffer // len(self.weights)))
        if self.epoch_steps > 0:
            first = epoch * self.epoch_steps
            mine = range(first + worker, first + self.epoch_steps, num_workers)
            skipped = np.array([s for s in mine if s < start], dtype=np.int64)
            steps = iter([s for s in mine if s >= start])
        else:
            first = max(0, -(-(start - worker) // num_workers))
            skipped = worker + num_workers * np.arange(first, dtype=np.int64)
            steps = _count(worker + first * num_workers, num_workers)
        drawn = self.drawn_before(skipped)  # examples each source gave the skipped steps
        step = next(steps, None)
        readers = {
            name: _SourceReader(name, self.sources[name], slot, slots,
                                f"{self.seed}-read-{epoch}-{self.rank}-{worker}-{name}", buffer, self,
                                drawn.get(name, 0))
            for name in self.weights
        }
        while step is not None:
            yield [readers[name].next() for name in self.step_sources(step)]
            step = next(steps, None)

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        start = 0
        if self.epoch < 0 and self.start_step:  # the first pass of a resumed run
            start = self.start_step
            self.epoch = start // self.epoch_steps - 1 if self.epoch_steps > 0 else -1
        self.epoch += 1
        for examples in self.batches(worker, num_workers, self.epoch, start):
            yield self.collate(examples)


_MASK = (1 << 64) - 1
_K1, _K2, _K3, _K4 = (np.uint64(k) for k in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                                              0xD6E8FEB86659FD93))
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _count(first: int = 0, stride: int = 1):
    n = first
    while True:
        yield n
        n += stride


class ValItems(torch.utils.data.Dataset):
    """Validation: every query, then every candidate, as (role, index, item); role 0 query, 1 candidate."""

    def __init__(self, examples: list[Example]):
        self.rows = [(0, i, ex.query) for i, ex in enumerate(examples)]
        self.rows += [(1, i, ex.positive) for i, ex in enumerate(examples)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class ValCollate:
    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows):
        roles = torch.tensor([r[0] for r in rows])
        index = torch.tensor([r[1] for r in rows])
        return roles, index, self.processor([r[2] for r in rows])
