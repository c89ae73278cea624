"""MMEB-V2 per-task scores -> the leaderboard's summary: Overall, the three modalities and their groups.

Aggregation (VLM2Vec ``experiments/report_score_v2.py#L190-203``; checked against the released
VLM2Vec-V2.0 score files, tests/eval/mmeb_v2/test_summary.py):

- a group's score is the unweighted mean over its tasks' main metric (``TaskPin.metric``);
- a modality's score (Image, Video, VisDoc) is the unweighted mean over its tasks (not over its groups);
- Overall is the unweighted mean over all tasks (not over the modalities or groups).

Scores go in as fractions (0..1, as the result records hold them) and come out in percent (x100), as the
leaderboard prints them. A summary with tasks missing is ``partial``: its means are over the tasks that
are there, and every output says so -- ``"partial": true`` and ``missing`` in the JSON, a PARTIAL line
above the markdown table, and MLflow metric names under ``mmeb_v2_partial/`` instead of ``mmeb_v2/`` so
a partial Overall is never charted beside a complete one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embedkit.errors import UserError
from embedkit.eval.mmeb_v2.protocol import GROUPS, Protocol
from embedkit.files import write_atomic

#: modality key -> the leaderboard's column name
MODALITY_NAMES = {"image": "Image", "video": "Video", "visdoc": "VisDoc"}
#: every column the leaderboard can have, in its order: Overall, then each modality before its groups
COLUMNS = ["Overall"] + [c for m, name in MODALITY_NAMES.items() for c in (name, *GROUPS[m])]
PREFIX, PARTIAL_PREFIX = "mmeb_v2", "mmeb_v2_partial"


@dataclass
class Summary:
    """The leaderboard numbers of one run (percent). ``counts[key] = [tasks scored, tasks pinned]`` for
    "Overall", each modality name and each group; a mean over no task is ``None``."""

    benchmark: str
    version: str
    protocol_fingerprint: str
    overall: float | None
    modalities: dict[str, float | None]
    groups: dict[str, float | None]
    counts: dict[str, list[int]]
    tasks: dict[str, float]
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return bool(self.missing)

    def to_dict(self) -> dict:
        return {**asdict(self), "partial": self.partial, "scale": "percent (score x 100)"}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(protocol: Protocol, task_scores: dict[str, float]) -> Summary:
    """``task_scores[name]`` = the task's main-metric score in 0..1 -> ``Summary``. Names the protocol does
    not have are listed in ``ignored`` (e.g. ``MomentSeeker_1k8`` in a v2.0.1 score file); tasks it has and
    the scores lack are ``missing`` (the summary is then partial). A score outside 0..1 is a ``UserError``."""
    bad = {n: s for n, s in task_scores.items() if not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0}
    if bad:
        name, value = next(iter(bad.items()))
        raise UserError(f"mmeb_v2 summary: task {name} has score {value!r}; scores must be fractions in 0..1")
    known = set(protocol.names())
    scored = {p.name: 100.0 * float(task_scores[p.name]) for p in protocol.tasks if p.name in task_scores}
    sets = {"Overall": protocol.names()}
    sets.update({MODALITY_NAMES[m]: names for m, names in protocol.modalities().items()})
    sets.update(protocol.groups())
    means = {key: _mean([scored[n] for n in names if n in scored]) for key, names in sets.items()}
    counts = {key: [sum(n in scored for n in names), len(names)] for key, names in sets.items()}
    return Summary(
        benchmark=protocol.benchmark, version=protocol.version, protocol_fingerprint=protocol.fingerprint(),
        overall=means["Overall"],
        modalities={MODALITY_NAMES[m]: means[MODALITY_NAMES[m]] for m in protocol.modalities()},
        groups={g: means[g] for g in protocol.groups()},
        counts=counts, tasks=scored,
        missing=[n for n in protocol.names() if n not in scored],
        ignored=sorted(set(task_scores) - known),
    )


# ------------------------------------------------------------------ outputs


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _columns(summary: Summary) -> list[tuple[str, float | None]]:
    """Overall, then per modality its mean followed by its groups (the leaderboard's column order)."""
    cols = [("Overall", summary.overall)]
    for modality, name in MODALITY_NAMES.items():
        if name in summary.modalities:
            cols.append((name, summary.modalities[name]))
            cols += [(g, summary.groups[g]) for g in GROUPS[modality] if g in summary.groups]
    return cols


def to_markdown(summary: Summary, label: str = "score") -> str:
    """A one-row markdown table (the leaderboard's columns, each header with its task count), preceded by
    the protocol line and, when partial, a PARTIAL line naming the missing tasks."""
    lines = [f"MMEB-V2 {summary.version} (protocol {summary.protocol_fingerprint[:12]}), percent, "
             f"mean over tasks: {summary.counts['Overall'][0]} of {summary.counts['Overall'][1]} tasks"]
    if summary.partial:
        lines.append(f"PARTIAL: {len(summary.missing)} task(s) missing, means are over the rest: "
                     + ", ".join(summary.missing))
    cols = _columns(summary)
    lines.append("")
    lines.append("| run | " + " | ".join(f"{k} ({summary.counts[k][0]})" for k, _ in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    lines.append(f"| {label} | " + " | ".join(_fmt(v) for _, v in cols) + " |")
    return "\n".join(lines) + "\n"


def metric_items(summary: Summary) -> dict[str, float]:
    """MLflow metrics: ``mmeb_v2/overall``, ``mmeb_v2/Image``, ``mmeb_v2/I-CLS``, ... (percent) and
    ``mmeb_v2/num_tasks``; a partial summary logs the same names under ``mmeb_v2_partial/``. Means over no
    task are left out."""
    prefix = PARTIAL_PREFIX if summary.partial else PREFIX
    items = {f"{prefix}/{_metric_key(k)}": v for k, v in _columns(summary) if v is not None}
    items[f"{prefix}/num_tasks"] = float(summary.counts["Overall"][0])
    return items


def _metric_key(column: str) -> str:
    return "overall" if column == "Overall" else column


def columns_from_metrics(metrics: dict[str, float]) -> tuple[dict[str, float], bool] | None:
    """A run's MLflow metrics (``metric_items`` names) -> ``({column: value}, partial)`` in leaderboard
    order, or None when the run has no MMEB-V2 summary. Complete wins over partial if both are there."""
    for prefix, partial in ((PREFIX, False), (PARTIAL_PREFIX, True)):
        values = {c: metrics[f"{prefix}/{_metric_key(c)}"] for c in COLUMNS if f"{prefix}/{_metric_key(c)}" in metrics}
        if values:
            return values, partial
    return None


def columns_from_summary(summary: Summary) -> dict[str, float]:
    """``{column: value}`` of a summary, leaderboard order, means over no task left out."""
    return {k: v for k, v in _columns(summary) if v is not None}


def write(out_dir, summary: Summary) -> tuple[Path, Path]:
    """``summary.json`` and ``summary.md`` in ``out_dir`` (each written under a temporary name, then
    renamed); their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "summary.json", out / "summary.md"
    write_atomic(js, json.dumps(summary.to_dict(), indent=2, sort_keys=True) + "\n")
    write_atomic(md, to_markdown(summary))
    return js, md


def from_dict(doc: dict) -> Summary:
    """A ``summary.json`` back into a ``Summary`` (compare reads run folders with it)."""
    keep = {k: doc[k] for k in Summary.__dataclass_fields__ if k in doc}
    return Summary(**keep)


def scores_from_results(results: dict) -> dict[str, float]:
    """A run's ``results.json`` (``{"tasks": {name: {"score": ...}}}``) -> ``{name: score}``."""
    tasks = results.get("tasks")
    if not isinstance(tasks, dict):
        raise UserError("mmeb_v2 results: no 'tasks' mapping (is this an mmeb_v2/results.json?)")
    return {name: rec["score"] for name, rec in tasks.items() if isinstance(rec, dict) and "score" in rec}
