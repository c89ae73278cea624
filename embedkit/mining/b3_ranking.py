"""The teacher half of B3 batch mining (``data.train.batching=b3``): a teacher encodes every training
query and positive, ``data/b3.py`` ranks and partitions them; the partition is cached by teacher + data +
settings + seed and copied into the run dir, where a resumed run reads it back.

The teacher is any model ``embedkit mine`` can load (``export.reader.open_model``: a run dir, a
checkpoint, an export, a sentence-transformers folder). Examples are read by index
(``data.b3.ExampleIndex``) and decoded with the teacher's frame policy and image cap, as ``mine`` does;
a sample the teacher cannot decode is left out of the partition (never drawn) and counted in a line.
Progress lines: the reading pass, the encoding (about every tenth of the items), the graph, the
partition.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from embedkit.data.b3 import B3Partition, B3Settings, ExampleIndex, build_partition, partition_fingerprint
from embedkit.data.reader import take
from embedkit.data.schema import Item
from embedkit.data.shard_set import ShardSet
from embedkit.inference import LazyItems


class IndexItems(LazyItems):
    """The queries (``role="query"``) or positives of examples ``rows`` of an ``ExampleIndex``, decoded
    on demand (in the inference engine's loader workers when it has any)."""

    def __init__(self, index: ExampleIndex, rows: list[int], role: str, decoding=None):
        self.index, self.rows, self.role, self.decoding = index, rows, role, decoding

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Item:
        key, files = self.index.read(self.rows[i])
        example, _, why = take(key, files, None, self.decoding)
        if example is None:
            raise RuntimeError(f"b3: sample {key} read before but not now ({why})")
        return getattr(example, self.role)


def teacher_fingerprint(spec: str | Path) -> str:
    """sha256 over the teacher's files (a file, or every file under a folder): path, size and mtime, so
    retraining or replacing the teacher makes a new partition without hashing gigabytes of weights."""
    path = Path(spec).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    rows = [[str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def readable(index: ExampleIndex, decoding, log: Callable[[str], None]) -> np.ndarray:
    """[N] bool: which examples the teacher can read (one pass, a progress line about every tenth)."""
    ok = np.zeros(len(index), dtype=bool)
    every = max(1, len(index) // 10)
    for i in range(len(index)):
        key, files = index.read(i)
        ok[i] = take(key, files, None, decoding)[0] is not None
        if (i + 1) % every == 0 or i + 1 == len(index):
            log(f"b3: read {i + 1}/{len(index)} examples")
    if not ok.all():
        log(f"b3: {int((~ok).sum())} examples the teacher cannot read are left out (never drawn)")
    return ok


def teacher_embeddings(encoder, index: ExampleIndex, batch_size: int,
                       log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query embeddings [N, D], positive embeddings [N, D], readable [N]) by ``encoder``; rows of
    unreadable examples are zero."""
    decoding = getattr(encoder, "decoding", None)
    ok = readable(index, decoding, log)
    rows = [int(i) for i in np.flatnonzero(ok)]
    out = []
    for role in ("query", "positive"):
        shown = [0]  # the items counted at the last line: a line about every tenth

        def progress(done: int, total: int, role=role, shown=shown) -> None:
            if done == total or done - shown[0] >= total / 10:
                shown[0] = done
                log(f"b3: teacher: {role} {done}/{total}")

        emb = encoder.encode_items(IndexItems(index, rows, role, decoding), batch_size=batch_size,
                                   progress=progress).float().numpy()
        full = np.zeros((len(index), emb.shape[1] if emb.ndim == 2 else 0), dtype=np.float32)
        full[rows] = emb
        out.append(full)
    return out[0], out[1], ok


def ensure_partition(teacher: str, shard_set: ShardSet, settings: B3Settings, seed: int, cache_dir: Path,
                     run_file: Path, batch_size: int = 32, log: Callable[[str], None] = print) -> B3Partition:
    """The run's B3 partition: the run dir's own (``run_file``, a resumed run), else the cache's for this
    teacher + data + settings + seed, else made now (the teacher opened, every example encoded) and
    written to the cache; either way copied to ``run_file``. ``batch_size``: the teacher's items per
    forward pass."""
    if run_file.is_file():
        log(f"b3: partition from {run_file}")
        return B3Partition.load(run_file)
    from embedkit.export.reader import open_model

    index = ExampleIndex(shard_set)
    key = partition_fingerprint(teacher_fingerprint(teacher), index.fingerprint(), settings, seed)
    cached = Path(cache_dir) / "b3" / f"{key}.json"
    if cached.is_file():
        log(f"b3: partition from the cache, {cached}")
        partition = B3Partition.load(cached)
    else:
        log(f"b3: ranking {len(index)} examples with the teacher {teacher}")
        encoder, _ = open_model(teacher, what="data.train.b3.teacher", kinds=("checkpoint", "run", "export",
                                                                               "sentence_transformers"))
        q, t, ok = teacher_embeddings(encoder, index, batch_size, log)
        partition = build_partition(q, t, index.source_of(), settings, seed, ok, log)
        partition.fingerprint = key
        partition.save(cached)
    partition.save(run_file)
    return partition

