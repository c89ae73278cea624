"""Streaming training batches from shards: subsets mixed by weight, task-homogeneous sub-batches,
split by rank and worker, processed per chunk inside the DataLoader workers.

A *source* is one folder of shards (an MMEB subset after ``embedkit data mmeb``; the demo is one
source). ``ShardStream`` is an IterableDataset; every (rank, worker) pair is a *reader slot* and
reads a disjoint share of every source: its own shards when a source has at least as many shards as
there are slots, else every ``slots``-th sample of each shard. Shards are resampled (a fresh seeded
permutation per pass) so a source never runs dry, and samples go through a per-source shuffle buffer
(raw bytes; decoding happens when a sample is drawn, so the buffer stays cheap).

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
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from embedkit.data.remote import ShardUnavailable
from embedkit.data.schema import Example, Item
from embedkit.data.shards import decode_sample, iter_samples

log = logging.getLogger(__name__)


@dataclass
class TrainBatch:
    """One device's share of a contrastive batch, already processed into model inputs."""

    query_chunks: list[dict]  # processed chunks of the B queries, in order
    candidate_chunks: list[dict]  # processed chunks of the B positives, then B*K negatives (example-major)
    batch_size: int  # B
    num_negatives: int  # K
    tasks: list[str]


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


class ChunkCollate:
    """Examples -> TrainBatch: lays out candidates, splits into chunks, runs the backbone processor."""

    def __init__(self, processor, chunk_size: int, num_negatives: int, chunk_tokens: int = 0):
        self.processor = processor
        self.chunk_size = chunk_size
        self.num_negatives = num_negatives
        self.chunk_tokens = chunk_tokens

    def split(self, items: list[Item]) -> list[list[Item]]:
        if not self.chunk_tokens:
            return chunked(items, self.chunk_size)
        lengths = [self.processor.num_tokens(it) for it in items]
        return chunked_by_tokens(items, lengths, self.chunk_size, self.chunk_tokens)

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

    def __call__(self, examples: list[Example]) -> TrainBatch:
        queries = [ex.query for ex in examples]
        cands = [ex.positive for ex in examples]
        cands += [n for i in range(len(examples)) for n in self.negatives(i, examples)]
        return TrainBatch(
            query_chunks=[self.processor(c) for c in self.split(queries)],
            candidate_chunks=[self.processor(c) for c in self.split(cands)],
            batch_size=len(examples),
            num_negatives=self.num_negatives,
            tasks=[ex.task for ex in examples],
        )


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


class _SourceReader:
    """Endless decoded examples of one source, for one reader slot (see the module docstring)."""

    def __init__(self, name: str, shards: list[str], slot: int, slots: int, rng: random.Random,
                 buffer: int, owner: "ShardStream"):
        self.name, self.shards, self.rng, self.buffer_size, self.owner = name, shards, rng, buffer, owner
        if len(shards) >= slots:
            self.mine, self.stride, self.offset = shards[slot::slots], 1, 0
        else:  # fewer shards than readers: split samples instead
            self.mine, self.stride, self.offset = shards, slots, slot
        self.raw = self._raw()
        self.buffer: list = []

    def _raw(self):
        fallback = False
        while True:
            got = 0
            for shard in self.rng.sample(self.mine, len(self.mine)):  # a fresh permutation per pass
                try:
                    for i, (key, files) in enumerate(iter_samples(shard)):
                        if i % self.stride == self.offset:
                            got += 1
                            yield shard, key, files
                except ShardUnavailable:  # a remote shard that cannot be had (retries spent): stop, say which
                    raise
                except Exception as exc:  # a truncated or unreadable tar: keep what was read, move on
                    self.owner.skip(f"the rest of {shard} ({exc})", shard)
            if got == 0:
                if fallback:
                    raise RuntimeError(f"training source {self.name!r} has no readable sample")
                log.warning("source %s: this reader's share is empty (fewer samples than readers); "
                            "reading all of it", self.name)
                self.mine, self.stride, self.offset, fallback = self.shards, 1, 0, True

    def next(self) -> Example:
        while True:
            while len(self.buffer) < self.buffer_size:
                self.buffer.append(next(self.raw))
            i = self.rng.randrange(len(self.buffer))
            self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
            shard, key, files = self.buffer.pop()
            try:
                return decode_sample(key, files)
            except Exception as exc:  # a corrupt image or a malformed sample: skip, count
                self.owner.skip(f"sample {key} in {shard} ({type(exc).__name__}: {exc})", f"{shard}#{key}")


class ShardStream(IterableDataset):
    def __init__(self, shards: list[str] | dict[str, list[str]], collate: ChunkCollate, local_batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                 mix: dict | None = None, task_batch_size: int = 0, epoch_steps: int = 0):
        self.sources = dict(shards) if isinstance(shards, dict) else group_shards(list(shards))
        self.weights = source_weights(self.sources, mix)
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
    def step_sources(self, step: int) -> list[str]:
        """The source of each example of this rank's batch at ``step``."""
        names, weights = list(self.weights), list(self.weights.values())
        b, t = self.local_batch_size, self.task_batch_size
        if t:  # seeded by step only: the same subset on every rank
            out = []
            for j in range(b // t):
                out += random.Random(f"{self.seed}-task-{step}-{j}").choices(names, weights)[0:1] * t
            return out
        return random.Random(f"{self.seed}-mix-{step}-{self.rank}").choices(names, weights, k=b)

    def batches(self, worker: int = 0, num_workers: int = 1, epoch: int = 0):
        """The examples of each batch this (rank, worker) builds, in order (before collation)."""
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        buffer = max(1, -(-self.shuffle_buffer // len(self.weights)))
        readers = {
            name: _SourceReader(name, self.sources[name], slot, slots,
                                random.Random(f"{self.seed}-read-{epoch}-{self.rank}-{worker}-{name}"), buffer, self)
            for name in self.weights
        }
        if self.epoch_steps > 0:
            steps = (epoch * self.epoch_steps + i for i in range(worker, self.epoch_steps, num_workers))
        else:
            steps = (worker + n * num_workers for n in _count())
        for step in steps:
            yield [readers[name].next() for name in self.step_sources(step)]

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        self.epoch += 1
        for examples in self.batches(worker, num_workers, self.epoch):
            yield self.collate(examples)


def _count():
    n = 0
    while True:
        yield n
        n += 1


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
