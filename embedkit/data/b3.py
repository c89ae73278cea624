"""B3 batch mining (``data.train.batching=b3``): batches drawn from communities of a teacher-ranked
preference graph, so every batch is rich in strong in-batch negatives.

Source: Thirukovalluru et al., "Breaking the Batch Barrier (B3) of Contrastive Learning via Smart Batch
Mining", arXiv 2505.11293 (NeurIPS'25), and its code (github.com/raghavlite/B3). The method, in its steps:

1. a teacher embeds every training query and positive; each query ranks the *other* examples'
   positives of its own subset by similarity (``rank_window``: the ranks ``lo..hi``, 1-based over the
   other examples; the very top ranks are skipped as likely false negatives);
2. a sparse preference graph: an edge ``i -- j`` for each ``j`` in ``i``'s window (undirected, weight =
   how many of the two directions chose it);
3. a partition of the graph into communities (B3: METIS into parts of ``cluster_size`` = 32, the
   ``chunk_size`` default of B3's ``src/arguments.py``, "Cluster sizes in metis"). Here: Louvain
   (``networkx.algorithms.community.louvain_communities``, seeded), each community laid out in
   breadth-first order over its own edges and cut into clusters of ``cluster_size``; the leftovers of
   communities smaller than a cluster are pooled and cut the same way (docs/batching.md says why);
4. batches: each epoch the clusters are shuffled (seeded by ``(seed, epoch)``), laid end to end and cut
   into global batches of ``global_batch`` examples; an incomplete last batch is dropped (as B3's
   sampler drops incomplete batches). With ``homogeneous`` (``data.train.task_batch_size`` > 0) each
   subset's clusters are cut into batches of their own and the batches of all subsets shuffled together
   (B3's ``same_datasets`` / ``ordered_datasets`` samplers: one dataset per batch).

The default window ``(30, 130)`` is read from the run name in B3's ``src/model/model.py``
("..._30.130_...") [unverified against the paper's text]; it needs subsets of more than 130 examples:
smaller subsets use the ranks that exist (``lo`` and ``hi`` are clipped to the subset's size).

Everything here is pure: the partition is a function of the embeddings and the settings (Louvain's seed
included), the batch of step ``s`` a function of (partition, seed, s), so a resumed run draws exactly the
batches the uninterrupted one drew (no reader state). ``ExampleIndex`` reads any example of a local shard
set by its index (the tar members' offsets, read once from the headers): the stream's hook.
"""

from __future__ import annotations

import hashlib
import json
import math
import tarfile
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from embedkit.data.remote import is_remote
from embedkit.data.shard_set import ShardSet
from embedkit.data.shards import sample_key
from embedkit.files import write_atomic

FORMAT = 1  # the partition file's format: bump when its layout or the partition's rules change


@dataclass(frozen=True)
class B3Settings:
    """The partition's settings (``data.train.b3``; defaults: B3's, sources in the module docstring)."""

    window: tuple[int, int] = (30, 130)  # rank window lo..hi (1-based, inclusive) over the other examples
    cluster_size: int = 32  # examples per cluster (B3's METIS part size)
    resolution: float = 1.0  # Louvain's resolution: > 1 gives smaller communities
    block: int = 1024  # queries per ranking matmul

    def __post_init__(self):
        lo, hi = self.window
        if not (1 <= lo <= hi):
            raise ValueError(f"data.train.b3.window={[lo, hi]}: need 1 <= lo <= hi")
        if self.cluster_size < 1:
            raise ValueError(f"data.train.b3.cluster_size={self.cluster_size}: need >= 1")

    def keyed(self) -> dict:
        """What the partition depends on (its cache key), ``block`` aside (it does not change the result)."""
        return {"window": list(self.window), "cluster_size": self.cluster_size, "resolution": self.resolution}


# -- reading examples by index ------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    name: str
    offset: int
    size: int


class ExampleIndex:
    """Every sample of a local shard set by its index: sources in the shard set's order, shards in
    order, samples in tar order (the counting rule of ``shards.count_samples``: a run of consecutive
    members with one key; a cut tar's last run left out). Built from the tar headers only."""

    def __init__(self, shard_set: ShardSet):
        remote = [s for s in shard_set.shards if is_remote(s)]
        if remote:
            raise ValueError(f"data.train.batching=b3 reads examples by index and needs local shards; "
                             f"{remote[0]} is remote")
        self.sources = list(shard_set.sources)
        self.entries: list[tuple[int, str, str, tuple[Member, ...]]] = []  # (source index, shard, key, members)
        for s, name in enumerate(self.sources):
            for shard in shard_set.sources[name]:
                self.entries += [(s, shard, key, members) for key, members in _tar_samples(shard)]

    def __len__(self) -> int:
        return len(self.entries)

    def source_of(self) -> np.ndarray:
        """The source index of every example [N]."""
        return np.array([e[0] for e in self.entries], dtype=np.int64)

    def read(self, i: int) -> tuple[str, dict[str, bytes]]:
        """(key, files) of example ``i``, as ``shards.iter_samples`` gives them."""
        _, shard, key, members = self.entries[i]
        with open(shard, "rb") as f:
            files = {}
            for m in members:
                f.seek(m.offset)
                files[m.name] = f.read(m.size)
        return key, files

    def fingerprint(self) -> str:
        """sha256 over every shard's path, size and sample count: the data half of the cache key."""
        seen = {}
        for _, shard, _, _ in self.entries:
            seen[shard] = seen.get(shard, 0) + 1
        rows = [[str(Path(s).resolve()), Path(s).stat().st_size, n] for s, n in seen.items()]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _tar_samples(shard: str) -> list[tuple[str, tuple[Member, ...]]]:
    """(key, members) of each complete sample of a local tar, from its headers."""
    out: list[tuple[str, tuple[Member, ...]]] = []
    key, members = None, []
    cut = False
    try:
        with tarfile.open(shard, "r") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k = sample_key(m.name)
                if key is not None and k != key:
                    out.append((key, tuple(members)))
                    members = []
                key = k
                members.append(Member(Path(m.name).name, m.offset_data, m.size))
    except (tarfile.TarError, OSError):
        cut = True  # a cut tar: the sample being read when the data ended is never yielded
    if key is not None and not cut:
        out.append((key, tuple(members)))
    return out


# -- the graph and its partition ----------------------------------------------------------------
def preference_edges(q: np.ndarray, t: np.ndarray, sources: np.ndarray, window: tuple[int, int],
                     block: int = 1024) -> dict[tuple[int, int], int]:
    """The sparse preference graph: ``{(i, j) with i < j: weight}``, an edge for each ``j`` among the ranks
    ``window`` of query ``i`` over the positives of the other examples of its own source (``q``, ``t``
    [N, D] teacher embeddings; ``sources`` [N]); weight 2 where both chose each other."""
    pairs = []
    for s in np.unique(sources):
        members = np.flatnonzero(sources == s)
        for rows, picks in _windows(q[members], t[members], window, block):
            pairs.append(np.stack([np.repeat(members[rows], picks.shape[1]), members[picks].ravel()], axis=1))
    if not pairs:
        return {}
    both = np.sort(np.concatenate(pairs), axis=1)  # undirected: (min, max)
    edges, weight = np.unique(both, axis=0, return_counts=True)
    return {(int(a), int(b)): int(w) for (a, b), w in zip(edges, weight)}


def _windows(q: np.ndarray, t: np.ndarray, window: tuple[int, int], block: int):
    """Per block of queries: (their local indices [b], the local indices of ``t`` at ranks
    window[0]..window[1] of each [b, w]), the query's own positive excluded; the window clipped to the
    ``n - 1`` others. Ties: the lower index first."""
    n = q.shape[0]
    lo, hi = min(window[0], n - 1), min(window[1], n - 1)
    if n < 2:
        return
    t64 = t.astype(np.float64)
    for start in range(0, n, block):
        sim = q[start:start + block].astype(np.float64) @ t64.T
        rows = np.arange(sim.shape[0])
        sim[rows, rows + start] = -np.inf
        yield rows + start, np.argsort(-sim, axis=1, kind="stable")[:, lo - 1:hi]


def communities(n: int, edges: dict[tuple[int, int], int], seed: int, resolution: float = 1.0) -> list[list[int]]:
    """Louvain communities of the graph on ``n`` nodes (an isolated node is its own), each in
    breadth-first order over its edges from its smallest node; ordered by their smallest node."""
    import networkx as nx
    from networkx.algorithms.community import louvain_communities

    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_weighted_edges_from((i, j, w) for (i, j), w in sorted(edges.items()))
    found = louvain_communities(g, weight="weight", resolution=resolution, seed=seed)
    return sorted((_bfs_order(g, c) for c in found), key=lambda c: c[0])


def _bfs_order(g, nodes) -> list[int]:
    """``nodes`` in breadth-first order over the edges among them (neighbours by index), each unreached
    part started from its smallest node: consecutive nodes are neighbours, so a cut keeps them close."""
    inside, seen, out = set(nodes), set(), []
    for root in sorted(inside):
        if root in seen:
            continue
        seen.add(root)
        todo = deque([root])
        while todo:
            v = todo.popleft()
            out.append(v)
            for u in sorted(g.neighbors(v)):
                if u in inside and u not in seen:
                    seen.add(u)
                    todo.append(u)
    return out


def make_clusters(groups: list[list[int]], cluster_size: int) -> list[list[int]]:
    """Each community cut into clusters of ``cluster_size`` in its order; the communities' remainders
    (and the communities smaller than a cluster) pooled in order and cut the same way; a last short
    pool is a cluster of its own."""
    clusters, pool = [], []
    for g in groups:
        full = len(g) - len(g) % cluster_size
        clusters += [g[k:k + cluster_size] for k in range(0, full, cluster_size)]
        pool += g[full:]
    clusters += [pool[k:k + cluster_size] for k in range(0, len(pool), cluster_size)]
    return clusters


# -- the partition, saved in the run dir and cached -----------------------------------------------
@dataclass
class B3Partition:
    """The clusters (lists of example indices) and their sources, with what they were made from."""

    clusters: list[list[int]]
    sources: list[int]  # the source index of each cluster
    n: int  # examples of the shard set when partitioned
    settings: dict = field(default_factory=dict)
    fingerprint: str = ""  # teacher + data + settings + seed
    excluded: list[int] = field(default_factory=list)  # examples the teacher could not read: never drawn

    def save(self, path: str | Path) -> None:
        """Write atomically (a reader never sees half of it)."""
        write_atomic(path, json.dumps({"format": FORMAT, **asdict(self)}, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> B3Partition:
        raw = json.loads(Path(path).read_text())
        if raw.pop("format", None) != FORMAT:
            raise ValueError(f"{path}: a B3 partition of another format; delete it to partition again")
        return cls(**raw)

    def cluster_of(self) -> dict[int, int]:
        return {i: c for c, members in enumerate(self.clusters) for i in members}


def partition_fingerprint(teacher: str, data: str, settings: B3Settings, seed: int) -> str:
    """The cache key of a partition: the teacher's fingerprint, the data's, the settings and the seed."""
    keyed = [FORMAT, teacher, data, settings.keyed(), seed]
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def build_partition(q: np.ndarray, t: np.ndarray, sources: np.ndarray, settings: B3Settings, seed: int,
                    ok: np.ndarray | None = None, log: Callable[[str], None] = print) -> B3Partition:
    """The partition of teacher embeddings ``q``, ``t`` [N, D] of examples from ``sources`` [N]; ``ok``
    [N] bool: the examples the teacher read (the others are left out of the graph and never drawn)."""
    n = q.shape[0]
    ok = np.ones(n, dtype=bool) if ok is None else ok
    keep = np.flatnonzero(ok)
    local = preference_edges(q[keep], t[keep], sources[keep], settings.window, settings.block)
    edges = {(int(keep[i]), int(keep[j])): w for (i, j), w in local.items()}
    log(f"b3: preference graph: {len(keep)} examples, {len(edges)} edges (rank window {list(settings.window)})")
    # communities never cross a subset (the graph has no such edge); the unread examples are isolated
    found = [c for c in communities(n, edges, seed, settings.resolution) if ok[c[0]]]
    groups = sorted(found, key=lambda c: (int(sources[c[0]]), c[0]))
    clusters = make_clusters(groups, settings.cluster_size)
    log(f"b3: {len(groups)} communities -> {len(clusters)} clusters of up to {settings.cluster_size}")
    return B3Partition(clusters, [int(sources[c[0]]) for c in clusters], n, settings.keyed(),
                       excluded=[int(i) for i in np.flatnonzero(~ok)])


# -- the batch plan: the batch of each step, a pure function of (partition, seed, step) ------------
class B3Plan:
    """Global batches of ``global_batch`` examples drawn from the clusters; this rank's share of the
    batch at a step is its slice ``[rank * local, (rank + 1) * local)``."""

    def __init__(self, partition: B3Partition, seed: int, global_batch: int, rank: int = 0, world: int = 1,
                 homogeneous: bool = False):
        self.partition, self.seed, self.global_batch = partition, seed, global_batch
        self.rank, self.world, self.homogeneous = rank, world, homogeneous
        self.local = global_batch // world
        self.steps_per_epoch = len(self._epoch(0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"data.train.batching=b3: the partition holds fewer examples than one global batch "
                             f"({global_batch}) per {'subset' if homogeneous else 'epoch'}")
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        """The global batches of one epoch, in order."""
        rng = np.random.default_rng([self.seed, epoch, 0xB3])
        clusters = [np.asarray(c, dtype=np.int64) for c in self.partition.clusters]
        if not self.homogeneous:
            return _cut(clusters, rng.permutation(len(clusters)), self.global_batch)
        batches: list[np.ndarray] = []
        by_source = np.asarray(self.partition.sources)
        for s in np.unique(by_source):
            mine = np.flatnonzero(by_source == s)
            batches += _cut(clusters, mine[rng.permutation(len(mine))], self.global_batch)
        return [batches[k] for k in rng.permutation(len(batches))]

    def global_indices(self, step: int) -> np.ndarray:
        """The example indices of the global batch at stream step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._epoch(epoch))
        return self._cached[1][k]

    def step_indices(self, step: int) -> list[int]:
        """This rank's example indices at stream step ``step``."""
        batch = self.global_indices(step)
        return [int(i) for i in batch[self.rank * self.local:(self.rank + 1) * self.local]]


def _cut(clusters: list[np.ndarray], order: Sequence[int], size: int) -> list[np.ndarray]:
    """``clusters`` laid end to end in ``order`` and cut into batches of ``size`` (the short rest dropped)."""
    flat = np.concatenate([clusters[k] for k in order]) if len(order) else np.zeros(0, dtype=np.int64)
    return [flat[k:k + size] for k in range(0, len(flat) - size + 1, size)]


def mean_intra_batch_similarity(batches: Sequence[Sequence[int]], emb: np.ndarray) -> float:
    """Mean cosine similarity between distinct members of each batch, averaged over the batches (the
    homogeneity measure of the research note's F4 acceptance: B3 batches >= 2x random ones)."""
    e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    means = []
    for b in batches:
        x = e[np.asarray(b)]
        m = len(b)
        if m > 1:
            sim = x @ x.T
            means.append((sim.sum() - np.trace(sim)) / (m * (m - 1)))
    return float(np.mean(means)) if means else math.nan
