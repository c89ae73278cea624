"""Lineage: where a run's weights came from, as a tree of nodes, written into the run dir
(``RunDir.lineage_path``) and into the MLflow run (tags), and shown by the export card.

A node is ``{"name", "path", "how", "step", "parents": [node, ...]}``: ``how`` is ``"fit"`` (a run from its
own initialisation), ``"fit init_from"`` (a stage started from its one parent's weights) or ``"merge
<method>"`` (merge's output, its inputs the parents). Each parent node is the parent's own lineage as it
stood when the child was made, so a chain reads back from the last run alone: stage 1 -> stage 2 ->
merge. A run without ``lineage.json`` is a leaf (``how="fit"``).
"""

from __future__ import annotations

import json
from pathlib import Path

from embedkit.files import write_atomic
from embedkit.runs import RunDir

#: MLflow tags: the parents' paths (comma-separated) and the whole chain as one line (``chain``)
PARENT_TAG = "embedkit.parent"
LINEAGE_TAG = "embedkit.lineage"


def node(name: str, path: str | Path, how: str, step: int | None = None, parents: list[dict] | None = None) -> dict:
    return {"name": name, "path": str(Path(path).expanduser().resolve()), "how": how, "step": step,
            "parents": list(parents or [])}


def of_run(run: RunDir, step: int | None = None) -> dict:
    """The lineage of a run dir: its ``lineage.json``, else a leaf named for the run."""
    if run.lineage_path.is_file():
        return json.loads(run.lineage_path.read_text())
    name = run.path.resolve().name
    if run.config_path.is_file():
        name = (run.saved_config().get("run") or {}).get("name") or name
    return node(name, run.path, "fit", step)


def of_source(path: str | Path, step: int | None = None) -> dict:
    """The lineage of a run dir or of a checkpoint file (its run dir's, else a leaf named for the file)."""
    path = Path(path).expanduser()
    run = RunDir(path) if path.is_dir() else RunDir.of_checkpoint(path)
    if run is not None and run.is_run():
        return of_run(run, step)
    return node(path.name, path, "fit", step)


def write(run: RunDir, lineage: dict) -> Path:
    """Write the run's ``lineage.json`` atomically."""
    write_atomic(run.lineage_path, json.dumps(lineage, indent=1) + "\n")
    return run.lineage_path


def chain(lineage: dict) -> str:
    """One line: ``a -> b -> c`` along single parents, ``(x + y) -> m`` for several."""
    parents = lineage.get("parents") or []
    if not parents:
        return lineage["name"]
    if len(parents) == 1:
        return f"{chain(parents[0])} -> {lineage['name']}"
    return f"({' + '.join(chain(p) for p in parents)}) -> {lineage['name']}"


def tags(lineage: dict) -> dict[str, str]:
    """The MLflow tags of a run with parents (none for a leaf)."""
    parents = lineage.get("parents") or []
    if not parents:
        return {}
    return {PARENT_TAG: ",".join(p["path"] for p in parents), LINEAGE_TAG: chain(lineage)[:5000]}
