"""Teach: copy a shard set, adding to every example its teacher's data (``embedkit teach``).

For each shard ``SRC/<rel>.tar`` (in sorted order; one progress line per shard, the encoder's windows
in between):

1. read every sample and its slots: query, positive, the example's own hard negatives;
2. encode every slot with the teacher (``mining.miner.encode_slots``: the inference engine, in chunks
   of ``batch_size``) -> ``<key>.teacher.npy``, [2 + k, Dt] in ``store_dtype`` (float16 by default:
   half the bytes, ~1e-3 relative precision, ample for a similarity distribution at τ = 0.02);
3. with a judge (``judge=NAME``, mining's judge plugins, ``mining/judges/``): score each example's own
   (query, candidate) pairs, positive first -> ``<key>.teacher_scores.npy``, float32 [1 + k];
4. write ``DST/<rel>.tar``: every member of the source sample as it is (a re-taught sample's old teacher
   members dropped), then the teacher members; atomically, then the shard's sidecar
   ``DST/.teach/<rel>.json`` (its counts). A shard with both is done: a killed ``teach`` resumes at the
   first shard without them, and a shard re-taught gives the same bytes (same inputs, same chunking:
   each shard is encoded on its own), so an interrupted and rerun teach equals an uninterrupted one.

The stored members are what ``data/shards.decode_sample`` reads into ``Example.teacher`` and
``data/batch.ChunkCollate`` lays out as the batch's candidates (``TrainBatch.teacher_*``). One process
(no rank split: a teacher pass is a one-off, and its shards are small next to the images they copy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from embedkit.data.shards import TEACHER_MEMBERS, Decoding, iter_samples, npy_bytes, write_shard
from embedkit.fault_points import fault_point
from embedkit.files import write_atomic
from embedkit.mining.judges.base import Judge, Pairs
from embedkit.mining.miner import Slot, encode_slots, slot_of

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class TeachSettings:
    batch_size: int = 32
    num_workers: int = 0  # the inference engine's loader processes
    store_dtype: str = "float16"  # the embeddings' dtype in the shards


@dataclass
class Sample:
    """One source sample: its key, files, and its slots in order (query, positive, negatives)."""

    key: str
    files: dict[str, bytes]
    slots: list[Slot]


def read_samples(path: str, decoding: Decoding | None) -> list[Sample]:
    """Every sample of a shard with its slots (decoded on demand, as mining's)."""
    decoding = decoding or Decoding()
    out = []
    for key, files in iter_samples(path):
        meta = json.loads(files[f"{key}.json"])
        tagged = [(meta["query"], "q"), (meta["positive"], "p")]
        tagged += [(s, f"n{i}") for i, s in enumerate(meta.get("negatives") or [])]
        out.append(Sample(key, files, [slot_of(key, files, s, tag, decoding) for s, tag in tagged]))
    return out


def judge_scores(judge: Judge, samples: list[Sample], emb: list[torch.Tensor]) -> list[np.ndarray]:
    """Each sample's judge scores of its own candidates (positive, then negatives), float32 [1 + k]:
    one ``judge.score`` call for the shard's pairs (query i with each of its candidates)."""
    qi = [(s, 0) for s, sample in enumerate(samples) for _ in sample.slots[1:]]
    ci = [(s, j) for s, sample in enumerate(samples) for j in range(1, len(sample.slots))]
    pairs = Pairs(torch.stack([emb[s][j] for s, j in qi]), torch.stack([emb[s][j] for s, j in ci]),
                  lambda: [samples[s].slots[j].item() for s, j in qi],
                  lambda: [samples[s].slots[j].item() for s, j in ci])
    scores = judge.score(pairs).double().cpu().numpy().astype(np.float32)
    out, at = [], 0
    for sample in samples:
        out.append(scores[at : at + len(sample.slots) - 1])
        at += len(sample.slots) - 1
    return out


def taught_files(sample: Sample, embeddings: np.ndarray, scores: np.ndarray | None) -> dict[str, bytes]:
    """The sample's members as stored, old teacher members dropped, then its new ones."""
    old = {f"{sample.key}.{m}" for m in TEACHER_MEMBERS.values()}
    files = {name: data for name, data in sample.files.items() if name not in old}
    files[f"{sample.key}.{TEACHER_MEMBERS['embeddings']}"] = npy_bytes(embeddings)
    if scores is not None:
        files[f"{sample.key}.{TEACHER_MEMBERS['scores']}"] = npy_bytes(scores)
    return files


class Teach:
    """``run()`` teaches every shard of ``shards`` ([(src shard, rel path)]) into ``out``."""

    def __init__(self, encoder, judge: Judge | None, shards: list[tuple[str, str]], out: str | Path,
                 settings: TeachSettings, log: Callable[[str], None] = print):
        self.encoder, self.judge, self.shards = encoder, judge, shards
        self.out, self.settings, self.log = Path(out), settings, log
        self.state = self.out / ".teach"
        self.dim: int | None = None

    def done(self, rel: str) -> bool:
        return (self.out / rel).is_file() and (self.state / f"{rel}.json").is_file()

    def run(self) -> dict[str, dict]:
        """{rel: the shard's stats (examples, dim)}, every shard (read from the sidecars where done)."""
        stats = {}
        for index, (src, rel) in enumerate(self.shards, 1):
            if self.done(rel):
                self.log(f"teach: {rel}: complete, skipped ({index}/{len(self.shards)} shards)")
            else:
                self.teach_shard(src, rel, f"{index}/{len(self.shards)} shards")
            stats[rel] = json.loads((self.state / f"{rel}.json").read_text())
        return stats

    def embed(self, samples: list, rel: str) -> list[torch.Tensor]:
        """Each sample's teacher rows [1 + 1 + k, D]: its query on the query side, its positive and negatives
        on the candidate side (``encode_items(side=)``: a teacher that frames documents apart, GME's system
        message, embeds them as documents)."""
        if not samples:
            return []
        log, size, workers = (lambda m: self.log(m.replace("mine: ", "teach: ", 1))), self.settings.batch_size, \
            self.settings.num_workers
        q = encode_slots(self.encoder, [s.slots[0] for s in samples], size, log, f"{rel} queries", workers)
        c = encode_slots(self.encoder, [slot for s in samples for slot in s.slots[1:]], size, log,
                         f"{rel} candidates", workers, side="candidate")
        return [torch.cat([q[i : i + 1], part]) for i, part in enumerate(c.split([len(s.slots) - 1 for s in samples]))]

    def teach_shard(self, src: str, rel: str, progress: str) -> None:
        samples = read_samples(src, getattr(self.encoder, "decoding", None))
        slots = [slot for sample in samples for slot in sample.slots]
        per_sample = self.embed(samples, rel)
        emb = torch.cat(per_sample) if per_sample else torch.empty(0, 0)
        scores = judge_scores(self.judge, samples, per_sample) if self.judge is not None and samples else None
        dtype = STORE_DTYPES[self.settings.store_dtype]
        out = [taught_files(sample, e.numpy().astype(dtype), None if scores is None else scores[i])
               for i, (sample, e) in enumerate(zip(samples, per_sample))]
        write_shard(self.out / rel, out)
        fault_point("teach_shard")
        counts = {"examples": len(samples), "dim": int(emb.shape[1]) if samples else 0,
                  "slots": len(slots), "scored": 0 if scores is None else int(sum(len(s) for s in scores))}
        write_atomic(self.state / f"{rel}.json", json.dumps(counts, sort_keys=True) + "\n")
        self.log(f"teach: wrote {rel}: {len(samples)} examples, {len(slots)} slots embedded"
                 f"{'' if scores is None else ', scored by the judge'} ({progress})")


def build_manifest(stats: dict[str, dict], source_entries: dict[str, dict], teaching: dict) -> dict:
    """The taught set's manifest: each subset's source record (``ShardSet.entry``: query modality...)
    with its counts and shards, and the ``teaching`` provenance (with the embeddings' dim)."""
    subsets: dict[str, dict] = {}
    for rel, counts in sorted(stats.items()):
        name = Path(rel).parent.name or "."
        subset = subsets.setdefault(name, {**source_entries.get(name, {}), "count": 0, "shards": []})
        subset["count"] += counts["examples"]
        subset["shards"].append({"path": rel, "count": counts["examples"]})
    dims = sorted({c["dim"] for c in stats.values() if c["examples"]})
    return {"subsets": subsets, "teaching": {**teaching, "dim": dims[0] if len(dims) == 1 else dims,
                                             "examples": sum(c["examples"] for c in stats.values())}}
