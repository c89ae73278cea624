"""``ShardStream``: the training examples of a ``ShardSet``, as batches of one device, built by step.

Where the parts live: the mixture plan (which source feeds each example of a step, a pure function of
seed and step) in ``data/mixture.py``; the seekable per-source reader in ``data/reader.py``; the
batch layout (``TrainBatch``, ``ChunkCollate``) in ``data/batch.py``; sources, counts and the
manifest in ``data/shard_set.py``. The stream joins them.

Batches are made by *step*, not by reader: worker ``w`` of ``W`` builds the steps ``s`` with
``s % W == w`` (the DataLoader takes workers round-robin, so batch ``s`` of every rank comes from
step ``s``). For each step the plan names a source per example and that source's reader (one per
(rank, worker) slot and source) gives the next example. ``epoch_steps`` > 0 gives every rank exactly
that many batches per epoch (``len()`` of the stream); 0 is endless (the run length is
``trainer.max_steps``). Either way every rank yields the same number of full batches, so DDP never
waits on a rank that ran dry. A resumed run starts the stream at its step (``start_step``): the
skipped steps cost their mixture draws and the readers' seeks, never a decoded sample.

An *optimizer step* is ``accumulate`` consecutive stream steps (``s // accumulate``; the module
counts its micro-batches the same way, across epochs and resumes). Under ``group_by="modality"`` a
source's modality is its queries' (``ShardSet.query_modality``: the manifest's where recorded, else
the majority of its first samples; a source with both rides along in the steps of its majority).
``length_order`` arranges examples by length (``mixture.arrange_by_length``) within the
micro-batches that one worker builds of one optimizer step -- all ``accumulate`` of them with
``num_workers`` <= 1, else the steps ``s % num_workers == worker`` among them. The group's examples
are the ones the unordered stream draws for those steps, only re-dealt; a resume inside an optimizer
step re-reads that worker's earlier micro-batches of it (at most ``accumulate - 1``), never more; an
optimizer step cut by the end of an epoch is arranged in its two parts. Re-dealing moves examples
between micro-batches, so it is refused with ``task_batch_size`` > 0.

A sample that fails to decode, one the backbone's processor would refuse (its ``refusal``, checked per
item as the sample is drawn, before it takes a place in a batch) or the rest of a truncated tar is
skipped and counted by reason (``skipped_by_reason``, ``shards.SKIP_REASONS``), and the batch is filled
from the next sample: batches are always full. Each ``TrainBatch`` carries the skips its worker counted
since its previous batch (``TrainBatch.skipped``), so the module sums exactly the skips of the batches it
trained on. The first few samples of each reason are logged as warnings, the rest at debug level. Shards
may be URLs or ``pipe:`` commands (``embedkit.data.remote``). Everything is deterministic in ``seed``.

``b3`` (``data.train.batching=b3``, ``data/b3.py``, docs/batching.md): the examples of each step are the
batch plan's (a pure function of the partition, the seed and the step), read by index from the tars
(``ExampleIndex``: member offsets read once from the headers); the mixture plan and the readers are not
used. ``length_order`` still re-deals an optimizer step's micro-batches; ``task_batch_size`` > 0 makes
each global batch one subset's clusters; ``mix`` and ``group_by`` are refused with it.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from embedkit.data.b3 import B3Partition, B3Plan, ExampleIndex
from embedkit.data.batch import ChunkCollate, TrainBatch
from embedkit.data.mixture import MixturePlan, arrange_by_length, source_weights
from embedkit.data.reader import SourceReader, take
from embedkit.data.schema import Example
from embedkit.data.shard_set import ShardSet
from embedkit.data.shards import Decoding

log = logging.getLogger(__name__)
#: skipped samples of one reason logged as warnings (per process); the rest at debug level
WARN_PER_REASON = 3


class ShardStream(IterableDataset):
    """An IterableDataset of ``TrainBatch``es (``collate`` applied to each step's examples) for one rank.

    ``shards``: a ``ShardSet``, shard paths/URLs, or {source: shards}; ``local_batch_size``: the
    per-device batch; ``mix``, ``task_batch_size``, ``group_by``: the mixture (``data/mixture.py``);
    ``epoch_steps``, ``start_step``, ``accumulate``, ``length_order``: see the module docstring.
    """

    def __init__(self, shards: ShardSet | list[str] | dict[str, list[str]], collate: ChunkCollate, local_batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000,
                 mix: dict | None = None, task_batch_size: int = 0, epoch_steps: int = 0,
                 start_step: int = 0, accumulate: int = 1, group_by: str = "none", length_order: str = "none",
                 resume_states: dict | None = None, decoding: Decoding | None = None, b3: B3Partition | None = None):
        self.shard_set = shards if isinstance(shards, ShardSet) else ShardSet(shards)
        self.sources = self.shard_set.sources
        self.weights = source_weights(self.shard_set, mix)
        self.b3 = None  # data.train.batching=b3: the batch plan (data/b3.py); the steps' examples by index
        if b3 is not None:
            self.b3 = self._b3_plan(b3, mix, group_by, seed, local_batch_size, rank, world_size, task_batch_size)
        if group_by not in ("none", "modality"):
            raise ValueError(f"data.train.group_by={group_by!r}: choose none or modality")
        if length_order not in ("none", "sorted", "balanced"):
            raise ValueError(f"data.train.length_order={length_order!r}: choose none, sorted or balanced")
        if length_order != "none" and task_batch_size:
            raise ValueError(f"data.train.length_order={length_order} re-deals examples among the micro-batches of "
                             f"an optimizer step, which would break data.train.task_batch_size={task_batch_size}'s "
                             "one-subset runs; set one of them")
        self.accumulate = max(1, accumulate)  # stream steps per optimizer step
        self.group_by = group_by
        self.length_order = length_order
        # source -> query modality (group_by=modality)
        self.modality = ({n: self.shard_set.query_modality(n) for n in self.weights} if group_by == "modality"
                         else {})
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
        self.plan = MixturePlan(self.weights, seed, local_batch_size, task_batch_size, rank, self.accumulate,
                                group_by, self.modality)
        self.epoch_steps = epoch_steps
        self.start_step = start_step  # resume: the first __iter__ starts at this step
        # resume: worker -> the reader_state of the last batch it gave the run (skips before start_step)
        self.resume_states = {int(w): st for w, st in (resume_states or {}).items()}
        self.reader_state: dict | None = None  # of the batch just built (batches() sets it)
        self.skipped = 0
        self.skipped_by_reason: Counter = Counter()  # this process's skips, by reason (shards.SKIP_REASONS)
        self.decoding = decoding  # the frame policy and image cap (data.video, data.max_image_pixels)
        self.resized = 0  # this process's images resized down to data.max_image_pixels (not skips)
        self._reported: Counter = Counter()  # the part of it already carried by a yielded batch
        self._warned: set[str] = set()  # samples and shards already warned about
        self.epoch = -1  # counted per process: persistent workers keep their copy across epochs

    def __len__(self):
        if self.epoch_steps > 0:
            return self.epoch_steps
        raise TypeError("an endless stream has no length (data.train.epoch_steps=0)")

    def skip(self, reason: str, what: str, where: str) -> None:
        """Count a skip by reason; warn the first time a given sample or shard fails (resampling meets it
        again), for the first few of each reason (debug level after that)."""
        self.skipped += 1
        self.skipped_by_reason[reason] += 1
        first = where not in self._warned
        self._warned.add(where)
        level = logging.WARNING if first and self.skipped_by_reason[reason] <= WARN_PER_REASON else logging.DEBUG
        log.log(level, "skipped %s; %d skipped so far on rank %d", what, self.skipped, self.rank)

    def resize(self, what: str) -> None:
        """Count an image resized down to ``data.max_image_pixels``; warn for the first few (debug after)."""
        self.resized += 1
        level = logging.WARNING if self.resized <= WARN_PER_REASON else logging.DEBUG
        log.log(level, "resized %s; %d resized so far on rank %d", what, self.resized, self.rank)

    def take_skipped(self) -> dict[str, int]:
        """The skips counted since the last call, by reason (carried by the next batch)."""
        delta = self.skipped_by_reason - self._reported
        self._reported = Counter(self.skipped_by_reason)
        return dict(delta)

    # -- the plan: which source feeds which example, by step (data/mixture.py) --------------------
    def step_modality(self, step: int) -> str | None:
        """The query modality of every example at ``step`` under group_by=modality, else None."""
        return self.plan.step_modality(step)

    def step_sources(self, step: int) -> list[str]:
        """The source of each example of this rank's batch at ``step``."""
        return self.plan.step_sources(step)

    # -- B3 (data/b3.py): each step's examples named by the batch plan, read by index -----------------
    def _b3_plan(self, partition: B3Partition, mix, group_by: str, seed: int, local: int, rank: int, world: int,
                 task_batch_size: int) -> B3Plan:
        """The plan of ``partition`` for this rank (``task_batch_size`` > 0: one subset per batch)."""
        if mix:
            raise ValueError("data.train.mix: not with data.train.batching=b3, which draws every example once "
                             "per epoch from its clusters")
        if group_by != "none":
            raise ValueError("data.train.group_by=modality: not with data.train.batching=b3 (batches are drawn "
                             "from communities; use data.train.task_batch_size for one subset per batch)")
        self.index = ExampleIndex(self.shard_set)
        if len(self.index) != partition.n:
            raise ValueError(f"data.train.batching=b3: the partition was made for {partition.n} examples, the "
                             f"shards hold {len(self.index)}")
        self._cluster_of = partition.cluster_of()
        return B3Plan(partition, seed, local * world, rank, world, homogeneous=task_batch_size > 0)

    def _b3_draw(self, step: int) -> list[Example]:
        return [self._b3_read(i) for i in self.b3.step_indices(step)]

    def _b3_read(self, i: int) -> Example:
        """Example ``i``; one that does not decode (or that the processor refuses) is skipped and counted,
        and the next member of its cluster read instead (cyclically), so the batch stays in its community."""
        cluster = self.b3.partition.clusters[self._cluster_of[i]]
        start = cluster.index(i)
        processor = getattr(self.collate, "processor", None)
        for k in range(len(cluster)):
            key, files = self.index.read(cluster[(start + k) % len(cluster)])
            example, reason, why = take(key, files, processor, self.decoding, self.resize)
            if example is not None:
                return example
            self.skip(reason, f"sample {key} ({why})", key)
        raise RuntimeError(f"data.train.batching=b3: no sample of the cluster of example {i} is readable")

    def batches(self, worker: int = 0, num_workers: int = 1, epoch: int = 0, start: int = 0,
                resume: dict | None = None):
        """The examples of each batch this (rank, worker) builds, in order (before collation), from
        step ``start`` on. Skipping costs the mixture draws of the skipped steps (a few seeded RNG
        calls each) and the readers' ``start``: no skipped sample is decoded. ``resume``: the
        ``reader_state`` of the last batch this worker gave the run (``TrainBatch.reader_state``), so
        that samples skipped before ``start`` move the readers on as they did in the run."""
        a = self.accumulate
        # length_order builds a worker's micro-batches of one optimizer step together: a start inside
        # one reads that worker's earlier micro-batches of it again (and yields from ``start`` on)
        read_from = start - start % a if self.length_order != "none" else start
        skipped, steps = self._steps(worker, num_workers, epoch, read_from)
        state = {"epoch": epoch, "worker": worker}
        if self.b3 is not None:  # a pure function of the step: no reader to move on
            readers: dict = {}
            draw = self._b3_draw
        else:
            readers = self._readers(worker, num_workers, epoch, self.plan.drawn_before(skipped),
                                    _skipped_before(resume, epoch, read_from))

            def draw(step):
                return [readers[name].next() for name in self.step_sources(step)]

        if self.length_order == "none":
            for step in steps:
                before = {n: r.skipped for n, r in readers.items()}
                examples = draw(step)
                self.reader_state = {**state, "first_step": step, "before": before,
                                     "after": {n: r.skipped for n, r in readers.items()}}
                yield examples
            return
        group: list[tuple[int, list[Example]]] = []  # this worker's steps of one optimizer step
        for nxt in itertools.chain(steps, [None]):
            if group and (nxt is None or nxt // a != group[0][0] // a):
                arranged = arrange_by_length([b for _, b in group], self.length_order)
                self.reader_state = {**state, "first_step": group[0][0], "before": before,
                                     "after": {n: r.skipped for n, r in readers.items()}}
                yield from (b for (s, _), b in zip(group, arranged) if s >= start)
                group = []
            if nxt is not None:
                if not group:
                    before = {n: r.skipped for n, r in readers.items()}
                group.append((nxt, draw(nxt)))

    def _steps(self, worker: int, num_workers: int, epoch: int, read_from: int):
        """(the steps of this worker before ``read_from``, as an array; an iterator of its steps from there)."""
        if self.epoch_steps > 0:
            first = epoch * self.epoch_steps
            mine = range(first + worker, first + self.epoch_steps, num_workers)
            return (np.array([s for s in mine if s < read_from], dtype=np.int64),
                    iter([s for s in mine if s >= read_from]))
        first = max(0, -(-(read_from - worker) // num_workers))
        return worker + num_workers * np.arange(first, dtype=np.int64), _count(worker + first * num_workers, num_workers)

    def _readers(self, worker: int, num_workers: int, epoch: int, drawn: dict, skipped: dict) -> dict:
        """A ``SourceReader`` per source for this (rank, worker), at the examples ``drawn`` before and the
        samples ``skipped`` before them."""
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        buffer = max(1, -(-self.shuffle_buffer // len(self.weights)))
        return {
            name: SourceReader(self.shard_set, name, slot, slots,
                               f"{self.seed}-read-{epoch}-{self.rank}-{worker}-{name}", buffer, self.skip,
                               drawn.get(name, 0), processor=getattr(self.collate, "processor", None),
                               skipped=skipped.get(name, 0), decoding=self.decoding, resize=self.resize)
            for name in self.weights
        }

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        start = 0
        if self.epoch < 0 and self.start_step:  # the first pass of a resumed run
            start = self.start_step
            self.epoch = start // self.epoch_steps - 1 if self.epoch_steps > 0 else -1
        self.epoch += 1
        if start and num_workers > 1:
            # the loader takes batches from its workers in turn, worker 0 first: the worker that built
            # step ``start`` in the uninterrupted run (with its reader) must be asked first; ``worker`` is
            # that role from here on (its readers, its steps, its ``reader_state``)
            first = self.epoch * self.epoch_steps if self.epoch_steps > 0 else 0
            worker = (worker + start - first) % num_workers
        resume = self.resume_states.get(worker) if start else None
        for examples in self.batches(worker, num_workers, self.epoch, start, resume):
            batch = self.collate(examples)
            if isinstance(batch, TrainBatch):
                batch.skipped, batch.reader_state = self.take_skipped(), self.reader_state
            yield batch


def _skipped_before(resume: dict | None, epoch: int, read_from: int) -> dict:
    """The samples each source's reader of this worker had skipped when it reached step ``read_from``,
    from the ``reader_state`` of the last batch the worker gave the run: its skips before that batch (or
    group) when the resume reads it again, else after it; none when it was another epoch's."""
    if not resume or resume.get("epoch") != epoch:
        return {}
    return resume["before"] if resume["first_step"] >= read_from else resume["after"]


def _count(first: int = 0, stride: int = 1):
    n = first
    while True:
        yield n
        n += stride
