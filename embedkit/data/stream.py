"""Streaming training batches from shards, processed per chunk inside the DataLoader workers.

``ShardStream`` is an endless IterableDataset: every (rank, worker) pair reads its own share of the
shards, resampled with a seeded RNG, through a shuffle buffer, and yields ready ``TrainBatch``es of
``local_batch_size`` examples. Being endless, every rank yields the same number of batches (the run
length is ``trainer.max_steps``), so DDP never waits on a rank that ran dry. A sample that fails to
decode, or a truncated tar, is skipped and counted; batches are always full.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch
from torch.utils.data import IterableDataset, get_worker_info

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


class ChunkCollate:
    """Examples -> TrainBatch: lays out candidates, splits into chunks, runs the backbone processor."""

    def __init__(self, processor, chunk_size: int, num_negatives: int):
        self.processor = processor
        self.chunk_size = chunk_size
        self.num_negatives = num_negatives

    def negatives(self, ex: Example) -> list[Item]:
        k = self.num_negatives
        if k == 0:
            return []
        if not ex.negatives:
            raise ValueError(f"data.train.num_negatives={k} but an example of task {ex.task!r} has none")
        # pad by cycling through the example's own negatives: exactly K per example
        return [ex.negatives[i % len(ex.negatives)] for i in range(k)]

    def __call__(self, examples: list[Example]) -> TrainBatch:
        queries = [ex.query for ex in examples]
        cands = [ex.positive for ex in examples] + [n for ex in examples for n in self.negatives(ex)]
        return TrainBatch(
            query_chunks=[self.processor(c) for c in chunked(queries, self.chunk_size)],
            candidate_chunks=[self.processor(c) for c in chunked(cands, self.chunk_size)],
            batch_size=len(examples),
            num_negatives=self.num_negatives,
            tasks=[ex.task for ex in examples],
        )


class ShardStream(IterableDataset):
    def __init__(self, shards: list[str], collate: ChunkCollate, local_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000):
        self.shards = list(shards)
        self.collate = collate
        self.local_batch_size = local_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.skipped = 0

    def _share(self, worker: int, num_workers: int) -> tuple[list[str], int, int]:
        """(shards this reader resamples from, sample stride, sample offset)."""
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        if len(self.shards) >= slots:
            return self.shards[slot::slots], 1, 0
        return self.shards, slots, slot  # fewer shards than readers: split samples instead

    def examples(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        shards, stride, offset = self._share(worker, num_workers)
        rng = random.Random(f"{self.seed}-{self.rank}-{worker}")
        while True:
            shard = shards[rng.randrange(len(shards))]
            try:
                for i, (key, files) in enumerate(iter_samples(shard)):
                    if i % stride != offset:
                        continue
                    try:
                        yield decode_sample(key, files)
                    except Exception as exc:  # a corrupt image or a malformed sample: skip, count
                        self.skipped += 1
                        log.warning("skipped sample %s in %s (%s); %d skipped so far", key, shard, exc, self.skipped)
            except Exception as exc:  # a truncated or unreadable tar: keep what was read, move on
                self.skipped += 1
                log.warning("stopped reading %s early (%s); %d skipped so far", shard, exc, self.skipped)

    def __iter__(self):
        rng = random.Random(f"shuffle-{self.seed}-{self.rank}-{(get_worker_info() or _Solo).id}")
        buffer, batch = [], []
        for ex in self.examples():
            buffer.append(ex)
            if len(buffer) < self.shuffle_buffer:
                continue
            batch.append(buffer.pop(rng.randrange(len(buffer))))
            if len(batch) == self.local_batch_size:
                yield self.collate(batch)
                batch = []


class _Solo:
    id = 0


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
