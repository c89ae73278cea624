"""Our MMEB-V2 scores beside a published score file, task by task, with the protocol pins that differ.

A published file is in VLM2Vec's per-model format (``experiments/public/all_scores/<version>/<model>.json``
of TIGER-AI-Lab/VLM2Vec): ``{"metadata": {...}, "metrics": {"image"|"video"|"visdoc": {task: {"hit@1": ..,
"ndcg_linear@5": .., ..., "num_data": N} | "FILE_N/A"}}}``. The file tells its metric values and each
task's count (``num_data``); the protocol of its version (or a given protocol file) tells the rest of its
pins. Our side is a run's ``mmeb_v2/results.json`` (scores, counts and the protocol the run used).

Each row: task, our score, theirs (both in percent, each side's pinned metric), the gap (ours - theirs),
and the pins that differ -- ``metric``, ``scope``, ``count``, ``instruction``, ``frames``, ``caps``,
``dataset``, ``revision`` (and ``parser``/``group``/``extra`` should an edited protocol move them) -- so a
gap is either explained by a protocol difference or shown to be real. Visdoc rows also carry our NDCG
computed with VLM2Vec's label/grade convention where the run recorded it (``ndcg_linear@5_vlm2vec``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embedkit.errors import UserError
from embedkit.eval.mmeb_v2.protocol import (
    Protocol,
    TaskPin,
    load_protocol,
    protocol_from_dict,
    protocol_from_file,
    sha256_of,
)

#: VLM2Vec's main metric per modality (experiments/report_score_v2.py#L88-92): for tasks no protocol pins
MODALITY_METRIC = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}

#: TaskPin field -> the pin name a report gives when it differs
PIN_NAMES = {"metric": "metric", "scope": "scope", "num_queries": "count", "query_instruction": "instruction",
             "candidate_instruction": "instruction", "frames": "frames", "pixels": "caps", "parser": "parser",
             "group": "group", "modality": "group"}
DATASET_PIN = {"hf_path": "dataset", "config": "dataset", "split": "dataset", "revision": "revision",
               "files": "revision"}


@dataclass
class Published:
    """A published score file: its model name, each task's modality and metric dict."""

    path: str
    model: str
    tasks: dict[str, dict]
    modality: dict[str, str]
    unavailable: list[str] = field(default_factory=list)


def read_published(path) -> Published:
    """A VLM2Vec score file -> ``Published``; a task whose entry is a status string (``FILE_N/A``) is
    listed in ``unavailable``. A file not in that format is a one-line ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"report: published score file {path} not found")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"report: {path} is not JSON ({exc.msg}, line {exc.lineno})") from None
    metrics = doc.get("metrics") if isinstance(doc, dict) else None
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        raise UserError(f"report: {path} is not a VLM2Vec score file (expected "
                        '{"metadata": ..., "metrics": {"image"|"video"|"visdoc": {task: {metric: value}}}})')
    tasks, modality, unavailable = {}, {}, []
    for mod, per_task in metrics.items():
        for name, entry in per_task.items():
            modality[name] = mod
            if isinstance(entry, dict):
                tasks[name] = entry
            else:
                unavailable.append(name)
    model = str((doc.get("metadata") or {}).get("model_name", path.stem))
    return Published(str(path), model, tasks, modality, unavailable)


def guess_version(published: Published) -> str:
    """The benchmark version a VLM2Vec score file was made under, from what changed between versions
    (CHANGELOG of VLM2Vec): no ``-doc`` OOD tasks -> v2.1; MomentSeeker with 1,800 queries -> v2.0.0;
    else v2.0.1."""
    if "ViDoSeek-doc" not in published.tasks and "MMLongBench-doc" not in published.tasks:
        return "v2.1"
    moments = published.tasks.get("MomentSeeker", {}).get("num_data")
    return "v2.0.0" if moments == 1800 else "v2.0.1"


def resolve_protocol(spec, published: Published | None = None) -> Protocol:
    """A ``Protocol``, a spec (``mmeb_v2@v2.0.0``), a YAML path, or None (guessed from ``published``)."""
    if isinstance(spec, Protocol):
        return spec
    if spec is None:
        if published is None:
            raise UserError("report: give the published file's protocol (mmeb_v2@VERSION or a protocol file)")
        return load_protocol(f"mmeb_v2@{guess_version(published)}")
    text = str(spec)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return protocol_from_file(text)
    return load_protocol(text)


def our_protocol(ours: dict) -> Protocol:
    """The protocol a run used, from its results: the embedded pins (``protocol.tasks``) when present,
    else the shipped protocol of its version, checked against the recorded fingerprint."""
    head = ours.get("protocol") or {}
    if isinstance(head.get("tasks"), list):
        proto = protocol_from_dict(head)
    else:
        proto = load_protocol(f"{head.get('benchmark', 'mmeb_v2')}@{head.get('version', '')}".rstrip("@"))
    recorded = head.get("fingerprint")
    if recorded and recorded != proto.fingerprint():
        raise UserError(f"report: the results were made under protocol {recorded[:12]}, not the shipped "
                        f"{proto.version} ({proto.fingerprint()[:12]}); pass our_protocol=<the protocol file used>")
    return proto


def pin_differences(mine: TaskPin | None, theirs: TaskPin | None) -> list[str]:
    """The names of the pins that differ between two tasks' pins (sorted, unique); [] when equal or
    when either side has no pin."""
    if mine is None or theirs is None or mine.fingerprint() == theirs.fingerprint():
        return []
    a, b = asdict(mine), asdict(theirs)
    found = {PIN_NAMES[k] for k in PIN_NAMES if a[k] != b[k]}
    found |= {DATASET_PIN.get(k, "dataset") for k in set(a["dataset"]) | set(b["dataset"])
              if a["dataset"].get(k) != b["dataset"].get(k)}
    if sha256_of(a["extra"]) != sha256_of(b["extra"]):
        found.add("instruction" if any("instruction" in k for k in {**a["extra"], **b["extra"]}) else "extra")
    return sorted(found)


@dataclass
class Row:
    """One task of the report (scores in percent; None where a side has no score)."""

    task: str
    group: str
    ours: float | None
    theirs: float | None
    gap: float | None
    our_metric: str | None
    their_metric: str | None
    our_count: int | None
    their_count: int | None
    differs: list[str]
    ours_vlm2vec_ndcg: float | None = None
    status: str = ""


def _pct(value) -> float | None:
    return None if value is None else 100.0 * float(value)


def _status(record, entry, mine, theirs, differs) -> str:
    """``same protocol`` / ``protocols differ`` when both sides scored the task; else which side lacks it
    and why: not in that side's protocol (``only ours``/``only theirs``) or pinned but not scored
    (``missing in ours``: a partial run; ``missing in theirs``: FILE_N/A in the published file)."""
    if record is not None and entry is not None:
        return "protocols differ" if differs else "same protocol"
    if record is None:
        return "missing in ours" if mine is not None else "only theirs"
    return "missing in theirs" if theirs is not None else "only ours"


def _row(name: str, record: dict | None, mine: TaskPin | None, theirs: TaskPin | None, pub: Published) -> Row:
    entry = pub.tasks.get(name)
    their_metric = theirs.metric if theirs else MODALITY_METRIC.get(pub.modality.get(name, ""))
    their_score = _pct(entry.get(their_metric)) if entry and their_metric else None
    our_score = _pct(record.get("score")) if record else None
    our_count = record.get("num_queries") if record else None
    their_count = entry.get("num_data") if entry else None
    differs = pin_differences(mine, theirs)
    if record and entry and our_count != their_count and "count" not in differs:
        differs = sorted(differs + ["count"])
    metric = record.get("metric", mine.metric if mine else None) if record else (mine.metric if mine else None)
    if record and entry and metric != their_metric and "metric" not in differs:
        differs = sorted(differs + ["metric"])
    gap = our_score - their_score if our_score is not None and their_score is not None else None
    status = _status(record, entry, mine, theirs, differs)
    return Row(name, (mine or theirs).group if (mine or theirs) else pub.modality.get(name, "?"), our_score,
               their_score, gap, metric, their_metric, our_count, their_count, differs,
               _pct(record.get("ndcg_linear@5_vlm2vec")) if record else None, status)


def compare(ours: dict, theirs_path, their_protocol=None, our_protocol_spec=None) -> list[Row]:
    """``ours``: a run's results dict (``mmeb_v2/results.json``); ``theirs_path``: a VLM2Vec score file;
    ``their_protocol``: its protocol (``Protocol``, spec, file, or None = guessed from the file);
    ``our_protocol_spec``: the protocol the run used when its results do not embed it. -> one ``Row``
    per task of either protocol (ours first, in order), then tasks only the published file has."""
    pub = read_published(theirs_path)
    theirs = resolve_protocol(their_protocol, pub)
    mine = resolve_protocol(our_protocol_spec) if our_protocol_spec else our_protocol(ours)
    records = ours.get("tasks") or {}
    names = list(dict.fromkeys(mine.names() + theirs.names()))
    names += [n for n in pub.tasks if n not in names and n in records]
    mine_pins, their_pins = {t.name: t for t in mine.tasks}, {t.name: t for t in theirs.tasks}
    return [_row(n, records.get(n), mine_pins.get(n), their_pins.get(n), pub) for n in names]


# ------------------------------------------------------------------ writers


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}" if digits < 0 else f"{value:.{digits}f}"


def to_markdown(rows: list[Row], title: str = "") -> str:
    """The per-task diff table, then one line counting rows per status."""
    head = [f"{title}\n" if title else "",
            "| task | group | ours | theirs | gap | metric (ours/theirs) | count (ours/theirs) | pins that differ "
            "| ours, VLM2Vec NDCG | status |",
            "|---|---|---:|---:|---:|---|---|---|---:|---|"]
    lines = [h for h in head if h]
    for r in rows:
        gap = "-" if r.gap is None else f"{r.gap:+.2f}"
        lines.append(f"| {r.task} | {r.group} | {_f(r.ours)} | {_f(r.theirs)} | {gap} | "
                     f"{r.our_metric or '-'} / {r.their_metric or '-'} | {r.our_count or '-'} / {r.their_count or '-'} | "
                     f"{', '.join(r.differs) or '-'} | {_f(r.ours_vlm2vec_ndcg)} | {r.status} |")
    tally: dict[str, int] = {}
    for r in rows:
        tally[r.status] = tally.get(r.status, 0) + 1
    lines.append("")
    lines.append("rows: " + ", ".join(f"{k} {v}" for k, v in tally.items()))
    return "\n".join(lines) + "\n"


def to_json(rows: list[Row], meta: dict | None = None) -> str:
    return json.dumps({**(meta or {}), "rows": [asdict(r) for r in rows]}, indent=2) + "\n"


def load_results(path) -> dict:
    """A run's results: ``<dir>/mmeb_v2/results.json``, ``<dir>/results.json`` or the file itself."""
    path = Path(path)
    for candidate in (path / "mmeb_v2" / "results.json", path / "results.json", path):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"report: {candidate} is not JSON ({exc.msg}, line {exc.lineno})") from None
    raise UserError(f"report: no mmeb_v2/results.json under {path} (run embedkit eval benchmark=mmeb_v2 out=...)")


def report_text(results, theirs_path, their_protocol=None, our_protocol_spec=None, fmt: str = "markdown") -> str:
    """The whole report for ``results`` (a dict, or a run folder / results.json path) against a published
    file, as markdown (a title line naming both sides and their protocols, then the table) or JSON."""
    ours = results if isinstance(results, dict) else load_results(results)
    pub = read_published(theirs_path)
    theirs = resolve_protocol(their_protocol, pub)
    rows = compare(ours, theirs_path, theirs, our_protocol_spec)
    head = ours.get("protocol") or {}
    meta = {"ours": {"protocol": {k: head.get(k) for k in ("benchmark", "version", "fingerprint")},
                     "partial": ours.get("partial", False)},
            "theirs": {"file": str(theirs_path), "model": pub.model,
                       "protocol": {"version": theirs.version, "fingerprint": theirs.fingerprint(),
                                    "guessed": their_protocol is None}}}
    groups = group_rows(ours, pub, theirs, our_protocol_spec)
    meta["groups"] = groups
    if fmt == "json":
        return to_json(rows, meta)
    guessed = " (guessed from the file)" if their_protocol is None else ""
    partial = " PARTIAL" if ours.get("partial") else ""
    title = (f"ours{partial}: protocol {head.get('version', '?')} ({str(head.get('fingerprint', ''))[:12]}) | "
             f"theirs: {pub.model}, protocol {theirs.version}{guessed} ({theirs.fingerprint()[:12]}); "
             "scores in percent, gap = ours - theirs")
    return groups_markdown(groups) + "\n" + to_markdown(rows, title)


def group_rows(ours: dict, pub: Published, theirs: Protocol, our_protocol_spec=None) -> dict[str, dict]:
    """Both sides' leaderboard numbers, each under its own protocol (``summary.summarize``): ``{"ours":
    {column: value}, "theirs": {...}, "partial": {"ours": bool, "theirs": bool}}``. A difference here mixes
    model and protocol; the per-task rows below it separate them."""
    from embedkit.eval.mmeb_v2 import summary as S

    mine = resolve_protocol(our_protocol_spec) if our_protocol_spec else our_protocol(ours)
    our_scores = {n: r["score"] for n, r in (ours.get("tasks") or {}).items() if isinstance(r, dict) and "score" in r}
    their_scores = {p.name: pub.tasks[p.name][p.metric] for p in theirs.tasks
                    if p.metric in pub.tasks.get(p.name, {})}
    a, b = S.summarize(mine, our_scores), S.summarize(theirs, their_scores)
    return {"ours": S.columns_from_summary(a), "theirs": S.columns_from_summary(b),
            "partial": {"ours": a.partial, "theirs": b.partial},
            "tasks": {"ours": a.counts["Overall"], "theirs": b.counts["Overall"]}}


def groups_markdown(groups: dict) -> str:
    """The two summaries and their difference as one small table (percent)."""
    cols = [c for c in groups["ours"] if c in groups["theirs"]]
    label = {side: side + (" (partial)" if groups["partial"][side] else "")
             + f" [{groups['tasks'][side][0]} tasks]" for side in ("ours", "theirs")}
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for side in ("ours", "theirs"):
        lines.append(f"| {label[side]} | " + " | ".join(f"{groups[side][c]:.2f}" for c in cols) + " |")
    lines.append("| gap | " + " | ".join(f"{groups['ours'][c] - groups['theirs'][c]:+.2f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_report(path, text: str) -> Path:
    """``text`` to ``path`` (temporary name, then renamed)."""
    from embedkit.files import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return path
