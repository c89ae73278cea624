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

An *optimizer step* is ``accumulate`` consecutive stream steps (``s // accumulate``; the module
counts its micro-batches the same way, across epochs and resumes). ``group_by="modality"`` makes
every optimizer step single-modality (LLaVE's ``--group_by_modality_length``): the step's query
modality (image or text) is drawn from ``(seed, s // accumulate)`` alone, with the probability of
the summed mixture weights of its sources, and every source draw of its micro-batches is made
among the sources of that modality only -- the same on every rank and worker, and a pure function
of the step, so a resume still starts anywhere without replay. A source's modality is its queries'
(image when the query has one), read once per process from ``manifest.json``'s
``subsets.<name>.query_modality`` where recorded, else from its first samples (up to 32): a source
with both counts by the majority of those (ties: image), and its other examples ride along in the
steps of that modality (MMEB's subsets are single-modality). ``length_order`` arranges examples by
length (words of the query and positive texts, LLaVE's ``modality_lengths``; images count 0)
within the micro-batches that one worker builds of one optimizer step -- all ``accumulate`` of
them with ``num_workers`` <= 1, else the steps ``s % num_workers == worker`` among them:
``"sorted"`` deals them longest first into consecutive micro-batches (length-homogeneous);
``"balanced"`` gives each, longest first, to the micro-batch with the fewest words so far that is
not full (equal word totals: LLaVE's ``split_to_even_chunks``). The group's examples are the ones
the unordered stream draws for those steps, only re-dealt; a resume inside an optimizer step
re-reads that worker's earlier micro-batches of it (at most ``accumulate - 1``), never more; an
optimizer step cut by the end of an epoch (``epoch_steps`` not a multiple of ``accumulate``) is
arranged in its two parts.
Re-dealing moves examples between micro-batches, so it is refused with ``task_batch_size`` > 0.

A sample that fails to decode (a corrupt image, a missing part) or a truncated tar is skipped,
counted and logged, and the batch is filled from the next sample: batches are always full. Shards
may be URLs or ``pipe:`` commands (``embedkit.data.remote``): a dropped connection is resumed
below the tar reader, so the stream is the same as over local copies; a remote shard that cannot
be had after the retries stops the run with ``ShardUnavailable`` (one line naming the URL).
Everything is deterministic in ``seed``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import random
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from embedkit.data.remote import ShardUnavailable, is_remote
from embedkit.data.schema import Example, Item, content_key
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
    #: int64 [B + B*K]: ``content_key`` of each candidate, in the layout of ``candidate_chunks``
    #: before chunking (positives, then negatives example-major); in-batch false-negative masking
    #: (``train.mask_duplicates``) compares them. None: not computed (masking cannot run).
    candidate_keys: torch.Tensor | None = None
    query_restore: torch.Tensor | None = None  # [B] long: batch row -> encoded row; None: in order
    candidate_restore: torch.Tensor | None = None  # [B*(1+K)] long, likewise
    padded_tokens: int = 0
    real_tokens: int = 0

    @property
    def pad_fraction(self) -> float:
        """Padding's share of the sequence slots of this batch's forward passes (0 when unknown)."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def pin_memory(self) -> "TrainBatch":
        """A copy whose tensors are in page-locked memory (``DataLoader(pin_memory=True)`` calls it in its
        pinning thread), so that the host-to-device copies run asynchronously (Lightning's transfer
        passes ``non_blocking=True`` on CUDA) instead of stalling the host."""
        import dataclasses

        return dataclasses.replace(
            self, query_chunks=_pinned(self.query_chunks), candidate_chunks=_pinned(self.candidate_chunks),
            candidate_keys=_pinned(self.candidate_keys), query_restore=_pinned(self.query_restore),
            candidate_restore=_pinned(self.candidate_restore))


def _pinned(x):
    """``x`` (a tensor, or dicts and lists of them) with every tensor pinned; anything else as is."""
    from lightning_utilities.core.apply_func import apply_to_collection

    return apply_to_collection(x, torch.Tensor, lambda t: t.pin_memory())


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
            candidate_keys=torch.tensor([content_key(c) for c in cands], dtype=torch.int64),
            query_restore=query_restore,
            candidate_restore=cand_restore,
            padded_tokens=padded,
            real_tokens=real,
        )


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


MODALITIES = ("image", "text")  # a query with an image, a text-only query


@functools.lru_cache(maxsize=None)
def query_modality(shards: tuple[str, ...], probe: int = 32) -> str:
    """``"image"`` or ``"text"``: the query modality of the source of ``shards`` (see the module
    docstring): ``manifest.json``'s ``query_modality`` for it where recorded, else the majority of
    its first ``probe`` samples (their JSON only; ties: image). Once per process."""
    first = Path(shards[0])
    manifest = first.parent.parent / "manifest.json"
    if not is_remote(shards[0]) and manifest.is_file():
        entry = json.loads(manifest.read_text()).get("subsets", {}).get(first.parent.name) or {}
        if entry.get("query_modality") in MODALITIES:
            return entry["query_modality"]
    votes: Counter = Counter()
    for shard in shards:
        try:
            for key, files in iter_samples(shard):
                try:
                    votes[bool(json.loads(files[f"{key}.json"])["query"].get("image"))] += 1
                except (KeyError, ValueError, TypeError, AttributeError):
                    continue  # a malformed sample: the stream skips it too
                if sum(votes.values()) >= probe:
                    break
        except ShardUnavailable:
            raise
        except Exception:  # a truncated or unreadable tar: what was read counts
            pass
        if sum(votes.values()) >= probe:
            break
    if not votes:
        raise RuntimeError(f"training source {first.parent.name!r} has no readable sample")
    return "image" if votes[True] >= votes[False] else "text"


def example_length(ex: Example) -> int:
    """Words of the query and positive texts: what ``length_order`` sorts by (LLaVE's
    ``modality_lengths``: ``len(qry.split()) + len(pos_text.split())``; images count 0)."""
    return len((ex.query.text or "").split()) + len((ex.positive.text or "").split())


def arrange_by_length(batches: list[list[Example]], order: str) -> list[list[Example]]:
    """The examples of equal-sized ``batches`` re-dealt by length, longest first (ties keep the draw
    order): ``"sorted"`` into consecutive batches; ``"balanced"`` each to the batch with the fewest
    words so far that is not full (the first such on ties), so word totals come out near equal."""
    if order == "none" or not batches:
        return batches
    examples = [e for b in batches for e in b]
    lengths = [example_length(e) for e in examples]
    ranked = sorted(range(len(examples)), key=lambda i: -lengths[i])
    size, n = len(batches[0]), len(batches)
    if order == "sorted":
        return [[examples[i] for i in ranked[k * size:(k + 1) * size]] for k in range(n)]
    out: list[list[Example]] = [[] for _ in range(n)]
    totals = [0] * n
    for i in ranked:
        k = min((k for k in range(n) if len(out[k]) < size), key=totals.__getitem__)
        out[k].append(examples[i])
        totals[k] += lengths[i]
    return out


def count_samples(path: str) -> int:
    """Samples in a tar shard as ``iter_samples`` yields them, from the member headers only (the
    data is seeked over, never read): what lets a reader skip whole shards on resume. A remote
    shard (URL, ``pipe:``) cannot be seeked over: it is read through once for its headers (nothing
    decoded) and its count kept for the process."""
    if is_remote(path):
        return _remote_count(path)
    return _count_members(lambda: tarfile.open(path, "r"))


@functools.lru_cache(maxsize=None)
def _remote_count(url: str) -> int:
    # a local open of a URL failed: the count was 0, and a resumed remote stream stopped with
    # "no readable sample"
    from embedkit.data.remote import open_shard

    with open_shard(url) as f:
        return _count_members(lambda: tarfile.open(fileobj=f, mode="r:"))


def _count_members(open_tar) -> int:
    n, key = 0, None
    try:
        with open_tar() as tar:
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
                 start_step: int = 0, accumulate: int = 1, group_by: str = "none", length_order: str = "none"):
        self.sources = dict(shards) if isinstance(shards, dict) else group_shards(list(shards))
        self.weights = source_weights(self.sources, mix)
        w = np.array(list(self.weights.values()), dtype=np.float64)
        self._cum = np.cumsum(w) / w.sum()
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
        self.modality: dict[str, str] = {}  # source -> query modality (group_by=modality)
        self._groups: list[tuple[np.ndarray, np.ndarray]] = []  # per MODALITIES: (source indices, cum. weights)
        self._p_image = 1.0
        if group_by == "modality":
            self.modality = {n: query_modality(tuple(self.sources[n])) for n in self.weights}
            mass = {m: sum(wt for n, wt in self.weights.items() if self.modality[n] == m) for m in MODALITIES}
            self._p_image = mass["image"] / sum(mass.values())
            for m in MODALITIES:
                idx = np.array([i for i, n in enumerate(self.weights) if self.modality[n] == m], dtype=np.int64)
                mw = w[idx] if len(idx) else np.ones(1)
                self._groups.append((idx, np.cumsum(mw) / mw.sum()))
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
        pure function of (seed, step, j) -- and of the rank when fully mixed; under group_by=modality
        also of the step's modality, itself a function of (seed, optimizer step) -- so any step's plan,
        or the counts of many steps, costs no history (vectorised: 10,000 steps in well under a ms)."""
        b, t = self.local_batch_size, self.task_batch_size
        steps = np.asarray(steps, dtype=np.uint64).reshape(-1, 1)
        j = np.arange(b // t if t else b, dtype=np.uint64).reshape(1, -1)
        tag = 0 if t else self.rank + 1  # task draws: the same subset on every rank
        u = _uniform(self.seed, tag, steps, j)
        if self.group_by != "modality":
            return np.minimum(np.searchsorted(self._cum, u, side="right"), len(self._cum) - 1)
        modality = self._step_modalities(steps.ravel())
        out = np.zeros(u.shape, dtype=np.int64)
        for m, (idx, cum) in enumerate(self._groups):
            rows = modality == m
            if rows.any():
                out[rows] = idx[np.minimum(np.searchsorted(cum, u[rows], side="right"), len(cum) - 1)]
        return out

    def _step_modalities(self, steps) -> "np.ndarray":
        """Index into MODALITIES of each stream step's optimizer step: a draw from (seed, step //
        accumulate) alone, the same on every rank and worker."""
        opt = np.asarray(steps, dtype=np.uint64) // np.uint64(self.accumulate)
        return (_uniform(self.seed, _MODALITY_TAG, opt, np.uint64(0)) >= self._p_image).astype(np.int64)

    def step_modality(self, step: int) -> str | None:
        """The query modality of every example at ``step`` under group_by=modality, else None."""
        return MODALITIES[int(self._step_modalities([step])[0])] if self.group_by == "modality" else None

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
        a = self.accumulate
        # length_order builds a worker's micro-batches of one optimizer step together: a start inside
        # one reads that worker's earlier micro-batches of it again (and yields from ``start`` on)
        read_from = start - start % a if self.length_order != "none" else start
        if self.epoch_steps > 0:
            first = epoch * self.epoch_steps
            mine = range(first + worker, first + self.epoch_steps, num_workers)
            skipped = np.array([s for s in mine if s < read_from], dtype=np.int64)
            steps = iter([s for s in mine if s >= read_from])
        else:
            first = max(0, -(-(read_from - worker) // num_workers))
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
        if self.length_order == "none":
            while step is not None:
                yield [readers[name].next() for name in self.step_sources(step)]
                step = next(steps, None)
            return
        group: list[tuple[int, list[Example]]] = []  # this worker's steps of one optimizer step
        for nxt in itertools.chain([step], steps, [None]):
            if group and (nxt is None or nxt // a != group[0][0] // a):
                arranged = arrange_by_length([b for _, b in group], self.length_order)
                yield from (b for (s, _), b in zip(group, arranged) if s >= start)
                group = []
            if nxt is not None:
                group.append((nxt, [readers[name].next() for name in self.step_sources(nxt)]))

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
_MODALITY_TAG = 0xFFFF_FFFF  # the tag of the per-optimizer-step modality draw (ranks use tags 0 .. world)


def _uniform(seed: int, tag: int, a, b) -> "np.ndarray":
    """A uniform [0, 1) per (seed, tag, a, b), broadcast over the uint64 arrays ``a`` and ``b``."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed & _MASK) * _K1) ^ (np.uint64(tag) * _K2) ^ (a * _K3) ^ (b * _K4)
        for shift, mult in ((30, _M1), (27, _M2)):  # splitmix64's finaliser
            x = (x ^ (x >> np.uint64(shift))) * mult
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


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
