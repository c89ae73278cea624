"""The mixture plan: which source feeds each example of each stream step, as a pure function of the
seed and the step (no history, no I/O), so a resumed run can start the plan at any step.

Weights (``source_weights``): ``data.train.mix`` where given, else each source's example count from
the shard set's manifest, else its number of shards. A local batch of ``B`` examples is
``B / task_batch_size`` sub-batches; the source of sub-batch ``j`` at step ``s`` is drawn from the
weights by a uniform seeded with ``(seed, s, j)`` only -- the same source on every rank, so gathered
negatives come from one task (VLM2Vec/LLaVE task-homogeneous batching). ``task_batch_size=0`` draws
each example's source independently per rank (fully mixed).

``group_by="modality"`` makes every optimizer step (``s // accumulate``) single-modality (LLaVE's
``--group_by_modality_length``): the step's query modality is drawn from ``(seed, s // accumulate)``
alone, with the probability of the summed weights of its sources, and every draw of its micro-batches
is made among the sources of that modality only. ``arrange_by_length`` re-deals the examples of one
worker's micro-batches of one optimizer step by length (``data.train.length_order``).

The uniforms are splitmix64's finaliser over (seed, tag, a, b): vectorised, 10,000 steps in well
under a millisecond.
"""

from __future__ import annotations

import numpy as np

from embedkit.data.schema import Example
from embedkit.data.shard_set import MODALITIES, ShardSet


def source_weights(shard_set: ShardSet, mix: dict | None = None) -> dict[str, float]:
    """Mixture weights: ``mix`` where given, else the source's example count recorded in the shard
    set's manifest, else its number of shards. Weight 0 leaves a source out. A lone source needs no
    count (every weight draws it)."""
    sources = shard_set.sources
    mix = dict(mix or {})
    unknown = sorted(set(mix) - set(sources))
    if unknown:
        raise ValueError(f"data.train.mix: unknown subset(s) {', '.join(unknown)}; sources: {', '.join(sources)}")
    weights: dict[str, float] = {}
    for name, shards in sources.items():
        if name in mix:
            weights[name] = float(mix[name])
        elif len(sources) == 1:
            weights[name] = 1.0
        else:
            weights[name] = float(shard_set.recorded_count(name) or len(shards))
    if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
        raise ValueError(f"data.train.mix: weights must be >= 0 with one > 0, got {weights}")
    return {n: w for n, w in weights.items() if w > 0}


class MixturePlan:
    """Source draws by step for one rank: ``weights`` {source: weight > 0} (their order is the index
    order of ``draws``), ``per_device_batch`` examples per step in sub-batches of ``task_batch_size``
    (0: fully mixed), and under ``group_by="modality"`` the ``modality`` {source: "image" | "text"}."""

    def __init__(self, weights: dict[str, float], seed: int, per_device_batch: int, task_batch_size: int = 0,
                 rank: int = 0, accumulate: int = 1, group_by: str = "none", modality: dict[str, str] | None = None):
        self.names = list(weights)
        self.seed, self.per_device_batch, self.task_batch_size = seed, per_device_batch, task_batch_size
        self.rank, self.accumulate, self.group_by = rank, max(1, accumulate), group_by
        w = np.array(list(weights.values()), dtype=np.float64)
        self._cum = np.cumsum(w) / w.sum()
        self._groups: list[tuple[np.ndarray, np.ndarray]] = []  # per MODALITIES: (source indices, cum. weights)
        self._p_image = 1.0
        if group_by == "modality":
            modality = modality or {}
            mass = {m: sum(wt for n, wt in weights.items() if modality[n] == m) for m in MODALITIES}
            self._p_image = mass["image"] / sum(mass.values())
            for m in MODALITIES:
                idx = np.array([i for i, n in enumerate(weights) if modality[n] == m], dtype=np.int64)
                mw = w[idx] if len(idx) else np.ones(1)
                self._groups.append((idx, np.cumsum(mw) / mw.sum()))

    def draws(self, steps) -> np.ndarray:
        """Source index of each draw at each of ``steps``: [len(steps), draws per step]. A draw is a
        pure function of (seed, step, j) -- and of the rank when fully mixed; under group_by=modality
        also of the step's modality, itself a function of (seed, optimizer step) -- so any step's plan,
        or the counts of many steps, costs no history."""
        b, t = self.per_device_batch, self.task_batch_size
        steps = np.asarray(steps, dtype=np.uint64).reshape(-1, 1)
        j = np.arange(b // t if t else b, dtype=np.uint64).reshape(1, -1)
        tag = 0 if t else self.rank + 1  # task draws: the same subset on every rank
        u = uniform(self.seed, tag, steps, j)
        if self.group_by != "modality":
            return np.minimum(np.searchsorted(self._cum, u, side="right"), len(self._cum) - 1)
        modality = self.step_modalities(steps.ravel())
        out = np.zeros(u.shape, dtype=np.int64)
        for m, (idx, cum) in enumerate(self._groups):
            rows = modality == m
            if rows.any():
                out[rows] = idx[np.minimum(np.searchsorted(cum, u[rows], side="right"), len(cum) - 1)]
        return out

    def step_modalities(self, steps) -> np.ndarray:
        """Index into MODALITIES of each stream step's optimizer step: a draw from (seed, step //
        accumulate) alone, the same on every rank and worker."""
        opt = np.asarray(steps, dtype=np.uint64) // np.uint64(self.accumulate)
        return (uniform(self.seed, MODALITY_TAG, opt, np.uint64(0)) >= self._p_image).astype(np.int64)

    def step_modality(self, step: int) -> str | None:
        """The query modality of every example at ``step`` under group_by=modality, else None."""
        return MODALITIES[int(self.step_modalities([step])[0])] if self.group_by == "modality" else None

    def step_sources(self, step: int) -> list[str]:
        """The source of each example of this rank's batch at ``step``."""
        t = self.task_batch_size
        return [self.names[i] for i in self.draws([step])[0] for _ in range(t or 1)]

    def drawn_before(self, steps) -> dict[str, int]:
        """Examples each source gives this rank over ``steps`` (the skipped steps of a resume)."""
        if len(steps) == 0:
            return {}
        counts = np.bincount(self.draws(steps).ravel(), minlength=len(self.names)) * (self.task_batch_size or 1)
        return {n: int(c) for n, c in zip(self.names, counts)}


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


_MASK = (1 << 64) - 1
_K1, _K2, _K3, _K4 = (np.uint64(k) for k in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                                              0xD6E8FEB86659FD93))
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
MODALITY_TAG = 0xFFFF_FFFF  # the tag of the per-optimizer-step modality draw (ranks use tags 0 .. world)


def uniform(seed: int, tag: int, a, b) -> np.ndarray:
    """A uniform [0, 1) per (seed, tag, a, b), broadcast over the uint64 arrays ``a`` and ``b``."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed & _MASK) * _K1) ^ (np.uint64(tag) * _K2) ^ (a * _K3) ^ (b * _K4)
        for shift, mult in ((30, _M1), (27, _M2)):  # splitmix64's finaliser
            x = (x ^ (x >> np.uint64(shift))) * mult
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
