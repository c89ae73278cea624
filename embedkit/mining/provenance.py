"""The mined shards' manifest: what produced them, and what mining dropped.

The mined shard set's manifest (``data.shard_set.write_manifest``: written last, atomically; sorted
keys, no timestamps, so re-mining the same inputs gives the same bytes)::

    {"subsets": {name: {"count": examples,            # what the training stream's mixture reads
                        "shards": [{"path": rel, "count": examples}]}},
     "mining": {"source": SRC, "source_shards": {rel: sha256}, "model": MODEL,
                "model_sha256": ..., "judge": {...}, "window": [lo, hi], "threshold": ...,
                "num_negatives": K, "pick": ..., "seed": ..., "dropped": {reason: n},
                "considered": n, "kept": n, "short": n}}

``ShardSet.manifest_sha256("mining")`` is the sha256 of that file for a list of training shards,
what ``embedkit fit`` tags its MLflow run with.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from embedkit.files import sha256_file as file_sha256  # noqa: F401 -- mine's name for it (commands/mine.py)


def model_sha256(model) -> str:
    """The mining model's hash, from its ``Provenance`` (``export.reader.open_model``): the checkpoint
    file its weights were read from (a checkpoint, a run dir's newest), else every file of the folder
    it was opened from (an export: names and contents, in sorted order)."""
    if model.checkpoint is not None:
        return file_sha256(model.checkpoint)
    folder = Path(model.source)
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def build_manifest(stats: dict[str, dict], mining: dict) -> dict:
    """The manifest from each shard's stats ({rel: counts}) and the mining settings and inputs."""
    subsets: dict[str, dict] = {}
    totals = {"considered": 0, "duplicate": 0, "false_negative": 0, "kept": 0, "short": 0}
    for rel, counts in sorted(stats.items()):
        name = Path(rel).parent.name or "."
        subset = subsets.setdefault(name, {"count": 0, "shards": []})
        subset["count"] += counts["examples"]
        subset["shards"].append({"path": rel, "count": counts["examples"]})
        for k in totals:
            totals[k] += counts[k]
    mining = {**mining, "considered": totals["considered"], "kept": totals["kept"], "short": totals["short"],
              "dropped": {"duplicate": totals["duplicate"], "false_negative": totals["false_negative"]}}
    return {"subsets": subsets, "mining": mining}
