"""The batch layout: ``TrainBatch``, the contract between ``data/`` and ``training/``, and how a
device's examples become one (``ChunkCollate``: candidates laid out, each side cut into chunks of
``train.chunk_size`` items and ``train.chunk_tokens`` padded tokens, optionally ordered by cost
first, each chunk run through the backbone's processor in the DataLoader workers); and the
validation rows (``ValItems``, ``ValCollate``: every query, then every candidate, tagged by ``Role``).

Batch words (``docs/architecture.md``): the global contrastive batch is split evenly over the
devices; ``TrainBatch.per_device_batch`` is one device's share; a chunk is one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch

from embedkit.data.schema import Example, Item, content_key


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
    per_device_batch: int  # B: examples of this device (the global contrastive batch / devices)
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
    #: samples the stream skipped, by reason (``shards.SKIP_REASONS``), since its worker's previous batch
    skipped: dict[str, int] = field(default_factory=dict)
    #: where the worker's readers stood (``ShardStream.reader_state``): kept by the data module for an
    #: exact resume past skipped samples; None outside a ``ShardStream``
    reader_state: dict | None = None
    #: taught shards (``embedkit teach``): the teacher's embeddings of the B queries [B, Dt] and of the
    #: candidates [B + B*K, Dt] in ``candidate_keys``' layout; a judge's scores [B, 1 + K] of each
    #: example's positive and K negative slots (NaN for a slot borrowed from another example). None
    #: unless every example of the batch carries it (the loss says so in one line where it needs it).
    teacher_queries: torch.Tensor | None = None
    teacher_candidates: torch.Tensor | None = None
    teacher_scores: torch.Tensor | None = None

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
            candidate_restore=_pinned(self.candidate_restore), teacher_queries=_pinned(self.teacher_queries),
            teacher_candidates=_pinned(self.teacher_candidates), teacher_scores=_pinned(self.teacher_scores))


def _pinned(x):
    """``x`` (a tensor, or dicts and lists of them) with every tensor pinned; anything else as is."""
    from lightning_utilities.core.apply_func import apply_to_collection

    return apply_to_collection(x, torch.Tensor, lambda t: t.pin_memory())


def side_processor(processor, side: str):
    """``processor`` set for one side, ``"query"`` or ``"candidate"`` (``ChunkProcessor.for_side``: a released
    embedder may frame the sides apart, GME's system messages); a plain callable as it is."""
    pick = getattr(processor, "for_side", None)
    return pick(side) if pick is not None else processor


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

    def split(self, items: list[Item], processor=None) -> list[list[Item]]:
        """Arrival-order chunks (``sort=False``'s layout); ``processor``: the side's, else ``self.processor``."""
        if not self.chunk_tokens:
            return chunked(items, self.chunk_size)
        lengths = [(processor or self.processor).num_tokens(it) for it in items]
        return chunked_by_tokens(items, lengths, self.chunk_size, self.chunk_tokens)

    def layout(self, items: list[Item], processor=None) -> tuple[list[list[Item]], torch.Tensor | None]:
        """(chunks, restore): ``restore`` maps batch rows to rows of the concatenated chunks (None: in order).
        ``processor``: the side's (``side_processor``; its frame counts in the costs), else ``self.processor``."""
        processor = processor or self.processor
        if not self.sort or len(items) < 2:
            return self.split(items, processor), None
        costs = processor.costs(items) if hasattr(processor, "costs") else [
            processor.num_tokens(it) for it in items]
        if self.chunk_tokens:
            groups = packed_by_tokens(costs, self.chunk_size, self.chunk_tokens)
        else:
            groups = chunked(cost_order(costs), self.chunk_size)
        order = [i for g in groups for i in g]
        restore = torch.empty(len(order), dtype=torch.long)
        restore[torch.tensor(order)] = torch.arange(len(order))
        return [[items[i] for i in g] for g in groups], restore

    def negative_sources(self, i: int, examples: list[Example]) -> list[tuple[int, int | None]]:
        """Where example i's K negative slots come from: (example, its negative index), or (another
        example, None) for that example's positive. Its own negatives, cycled; an example with none
        (most MMEB subsets) borrows the positives of the other examples of its batch, which are true
        in-batch negatives of its query."""
        k, ex = self.num_negatives, examples[i]
        if k == 0:
            return []
        if ex.negatives:
            return [(i, j % len(ex.negatives)) for j in range(k)]
        others = [j for j in range(len(examples)) if j != i]
        if not others:
            raise ValueError(f"data.train.num_negatives={k} but an example of task {ex.task!r} has none "
                             "and its batch has no other example to borrow from")
        return [(others[(i + j) % len(others)], None) for j in range(k)]

    def negatives(self, i: int, examples: list[Example]) -> list[Item]:
        """Exactly K negatives for example i (``negative_sources``)."""
        return [examples[e].positive if j is None else examples[e].negatives[j]
                for e, j in self.negative_sources(i, examples)]

    def __call__(self, examples: list[Example]) -> TrainBatch:
        queries = [ex.query for ex in examples]
        cands = [ex.positive for ex in examples]
        cands += [n for i in range(len(examples)) for n in self.negatives(i, examples)]
        query_proc, cand_proc = side_processor(self.processor, "query"), side_processor(self.processor, "candidate")
        query_groups, query_restore = self.layout(queries, query_proc)
        cand_groups, cand_restore = self.layout(cands, cand_proc)
        query_chunks = [query_proc(c) for c in query_groups]
        candidate_chunks = [cand_proc(c) for c in cand_groups]
        padded, real = pad_counts(query_chunks + candidate_chunks)
        return TrainBatch(
            query_chunks=query_chunks,
            candidate_chunks=candidate_chunks,
            per_device_batch=len(examples),
            num_negatives=self.num_negatives,
            tasks=[ex.task for ex in examples],
            candidate_keys=torch.tensor([content_key(c) for c in cands], dtype=torch.int64),
            query_restore=query_restore,
            candidate_restore=cand_restore,
            padded_tokens=padded,
            real_tokens=real,
            **self.teacher(examples),
        )

    def teacher(self, examples: list[Example]) -> dict:
        """The ``teacher_*`` fields of the batch (``TrainBatch``), laid out as its candidates; {} unless
        every example carries teacher data."""
        import numpy as np

        if not examples or any(ex.teacher is None for ex in examples):
            return {}
        sources = [self.negative_sources(i, examples) for i in range(len(examples))]
        out = {}
        if all(ex.teacher.embeddings is not None for ex in examples):
            emb = [np.asarray(ex.teacher.embeddings, dtype=np.float32) for ex in examples]
            rows = [e[1] for e in emb] + [emb[e][1 if j is None else 2 + j] for src in sources for e, j in src]
            out["teacher_queries"] = torch.from_numpy(np.stack([e[0] for e in emb]))
            out["teacher_candidates"] = torch.from_numpy(np.stack(rows))
        if all(ex.teacher.scores is not None for ex in examples):
            out["teacher_scores"] = torch.tensor(
                [[float(ex.teacher.scores[0])] + [float(ex.teacher.scores[1 + j]) if e == i and j is not None
                                                  else float("nan") for e, j in sources[i]]
                 for i, ex in enumerate(examples)], dtype=torch.float32)
        return out


def pad_counts(chunks: list[dict]) -> tuple[int, int]:
    """(sequence slots, real tokens) over processed chunks, from their attention masks."""
    padded = real = 0
    for chunk in chunks:
        mask = chunk.get("attention_mask") if isinstance(chunk, dict) else None
        if mask is not None:
            padded += mask.numel()
            real += int(mask.sum())
    return padded, real


class Role(IntEnum):
    """What a validation row is: a query, or the candidate (positive) of the query with its index."""

    QUERY = 0
    CANDIDATE = 1


class ValItems(torch.utils.data.Dataset):
    """Validation: every query, then every candidate, as (role, index, item); with ``chunk_size``, those rows
    cut into chunks of at most ``chunk_size`` rows of one role each (``self[i]`` a list of rows: a loader
    with ``batch_size=None``), so that each chunk is processed for its side (``ValCollate``)."""

    def __init__(self, examples: list[Example], chunk_size: int | None = None):
        queries = [(Role.QUERY, i, ex.query) for i, ex in enumerate(examples)]
        candidates = [(Role.CANDIDATE, i, ex.positive) for i, ex in enumerate(examples)]
        self.rows = queries + candidates
        if chunk_size:
            self.rows = chunked(queries, chunk_size) + chunked(candidates, chunk_size)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class ValCollate:
    """Rows of ``ValItems`` -> (roles [n] long, with ``Role`` values; example indices [n]; processed items).
    Rows of one role are processed for their side (``side_processor``); a chunk mixing roles (a ``ValItems``
    without ``chunk_size``) by the default processor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows):
        roles = torch.tensor([int(r[0]) for r in rows])
        index = torch.tensor([r[1] for r in rows])
        sides = {r[0] for r in rows}
        processor = self.processor
        if len(sides) == 1:
            processor = side_processor(processor, "query" if sides == {Role.QUERY} else "candidate")
        return roles, index, processor([r[2] for r in rows])
