"""The runs of one MLflow experiment side by side (the ``embedkit compare`` verb: commands/compare.py).

    embedkit compare [experiment=NAME] [metric=val/p@1,train/loss ...] [tracking.uri=URI]
                     [format=markdown|csv] [plot=out.png]

One row per run (oldest first): the run's name, the params whose values differ between the runs
(params are the flattened config, dotted keys: ``loss.name``, ``train.lr``; ``run.name`` and
``run.dir`` always differ and are left out), and for each chosen metric its best value (the lowest
for a metric whose name holds ``loss``, else the highest) and its final value (at the last step).

Defaults: the store is ``store.resolve_uri`` (``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///runs/mlflow.db`` of the working directory); no experiment means
the experiment of the most recently started run in the store; no metric means those of
``DEFAULT_METRICS`` the runs have (else every metric they have). Metric names are given as logged
in code (``val/p@1``); MLflow refuses ``@`` so the store holds ``val/p_at_1``, mapped here both
ways. ``--plot`` draws each metric's curve per run (matplotlib, Agg backend) and logs the PNG as an
artifact of a run tagged ``embedkit.kind=compare`` in the same experiment (such runs are never
compared themselves).

MMEB-V2: runs that logged the leaderboard summary (``mmeb_v2/overall``, ``mmeb_v2/Image``,
``mmeb_v2/I-CLS``, ... from ``eval.mmeb_v2.summary.metric_items``) get a second table, one row per run and
one column per group in the leaderboard's order (Overall, Image, I-CLS..I-VG, Video, V-CLS..V-MRET,
VisDoc, ViDoRe-V1..OOD), a partial summary's row marked ``(partial)``; ``plot=`` then also draws the
groups as a bar chart (``<plot stem>_mmeb_v2.png``). ``runs=DIR,...`` reads the same from eval output
folders (``<dir>/mmeb_v2/summary.json``) without an MLflow store.

Stages: when a run was started from another's weights (``embedkit fit init_from=``; a merge's inputs), the
table gets a ``lineage`` column with its chain (``stage1 -> stage2``, from the ``embedkit.lineage`` tag).
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from embedkit.errors import UserError
from embedkit.eval.mmeb_v2 import summary as mmeb_summary
from embedkit.files import atomic_path
from embedkit.tracking.lineage import LINEAGE_TAG
from embedkit.tracking.store import display_name, is_sqlite, resolve_uri, sqlite_path, stored_name

DEFAULT_METRICS = ("val/p@1", "eval/overall/p@1", "train/loss")
HIDDEN_PARAMS = ("run.name", "run.dir")
KIND_TAG = "embedkit.kind"
MMEB_PREFIXES = (f"{mmeb_summary.PREFIX}/", f"{mmeb_summary.PARTIAL_PREFIX}/")


# ------------------------------------------------------------------ names


# ------------------------------------------------------------------ reading the store


def open_store(uri: str | None):
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(uri)
    if is_sqlite(uri) and not sqlite_path(uri).is_file():
        raise UserError(f"tracking.uri: no MLflow store at {sqlite_path(uri)} (run embedkit fit first)")
    return MlflowClient(tracking_uri=uri)


def _is_compare(run) -> bool:
    return run.data.tags.get(KIND_TAG) == "compare"


def pick_experiment(client, name: str | None):
    experiments = client.search_experiments()
    if name is not None:
        for exp in experiments:
            if exp.name == name:
                return exp
        names = ", ".join(sorted(e.name for e in experiments)) or "none"
        raise UserError(f"experiment: no experiment {name!r} in the store; experiments: {names}")
    ids = [e.experiment_id for e in experiments]
    latest = None
    for run in client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=20):
        if not _is_compare(run):
            latest = run
            break
    if latest is None:
        raise UserError("compare: the store holds no runs (run embedkit fit first)")
    return client.get_experiment(latest.info.experiment_id)


def list_runs(client, experiment_id: str) -> list:
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"], max_results=10000)
    return [r for r in runs if not _is_compare(r)]


def differing_params(runs: list) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.params} - set(HIDDEN_PARAMS))
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def choose_metrics(runs: list, requested: list[str]) -> list[str]:
    if requested:
        return requested
    present = {display_name(k) for r in runs for k in r.data.metrics}
    chosen = [m for m in DEFAULT_METRICS if m in present]
    # the MMEB-V2 summary has its own groups table (mmeb_rows_from_runs), not best/final columns here
    return chosen or sorted(m for m in present if not m.startswith(MMEB_PREFIXES))


def history(client, run, name: str) -> list[tuple[int, float]]:
    """``(step, value)`` of metric ``name`` (display form), in step order."""
    for key in (stored_name(name), name, name.replace("@", "")):
        if key in run.data.metrics:
            points = client.get_metric_history(run.info.run_id, key)
            return [(p.step, p.value) for p in sorted(points, key=lambda p: (p.step, p.timestamp))]
    return []


def lower_is_better(name: str) -> bool:
    return "loss" in name


def build_table(client, runs: list, metrics: list[str]) -> tuple[list[str], list[list], dict]:
    """Header, rows and the curves ``{metric: {run label: [(step, value)]}}``."""
    params = differing_params(runs)
    # a staged run's chain (stage 1 -> stage 2 -> merge), from the tag fit sets (tracking/lineage.py)
    chains = [r.data.tags.get(LINEAGE_TAG, "") for r in runs] if any(LINEAGE_TAG in r.data.tags for r in runs) else None
    header = ["run", "run_id"] + (["lineage"] if chains else []) + params
    for m in metrics:
        header += [f"{m} best", f"{m} final"]
    rows, curves = [], {m: {} for m in metrics}
    for i, r in enumerate(runs):
        label = r.info.run_name or r.info.run_id[:8]
        row = [label, r.info.run_id] + ([chains[i] or label] if chains else []) + [r.data.params.get(k, "") for k in params]
        for m in metrics:
            points = history(client, r, m)
            curves[m][label] = points
            if points:
                values = [v for _, v in points]
                best = min(values) if lower_is_better(m) else max(values)
                row += [best, points[-1][1]]
            else:
                row += ["", ""]
        rows.append(row)
    return header, rows, curves


# ------------------------------------------------------------------ output


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_markdown(header: list[str], rows: list[list]) -> str:
    short = [[r[0], r[1][:8]] + r[2:] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in short]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_cell(v) if isinstance(v, float) else v for v in r] for r in rows])
    return buf.getvalue()


def save_png(fig, path: str | Path) -> Path:
    """``fig`` written to ``path`` as a PNG (atomically: a kill leaves the old file or none), then closed."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def plot_curves(curves: dict, path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6), squeeze=False)
    labels = list(dict.fromkeys(label for per_run in curves.values() for label in per_run))
    colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per run everywhere
    for ax, (metric, per_run) in zip(axes[0], curves.items()):
        for label, points in per_run.items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=label, color=colour[label])
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)


def log_plot(client, experiment_id: str, png: Path, runs: list) -> str:
    run = client.create_run(
        experiment_id,
        run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={KIND_TAG: "compare", "embedkit.compare.runs": ",".join(r.info.run_id for r in runs)},
    )
    client.log_artifact(run.info.run_id, str(png), artifact_path="compare")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


# ------------------------------------------------------------------ MMEB-V2 groups


@dataclass
class GroupRow:
    """One run's MMEB-V2 leaderboard numbers (percent): ``values[column]``, whether partial, the version."""

    label: str
    values: dict[str, float]
    partial: bool = False
    version: str = ""


def mmeb_rows_from_runs(runs: list) -> list[GroupRow]:
    """The runs (MLflow) that logged an MMEB-V2 summary, as rows (each metric's latest value)."""
    rows = []
    for r in runs:
        found = mmeb_summary.columns_from_metrics({display_name(k): v for k, v in r.data.metrics.items()})
        if found:
            rows.append(GroupRow(r.info.run_name or r.info.run_id[:8], found[0], found[1]))
    return rows


def mmeb_rows_from_dirs(dirs: list[str]) -> list[GroupRow]:
    """Eval output folders (``<dir>/mmeb_v2/summary.json``, or a summary.json itself) as rows; a folder
    without one is a ``UserError`` naming it."""
    rows = []
    for d in dirs:
        path = next((p for p in (Path(d) / "mmeb_v2" / "summary.json", Path(d) / "summary.json", Path(d))
                     if p.is_file()), None)
        if path is None:
            raise UserError(f"runs: no mmeb_v2/summary.json under {d} (run embedkit eval benchmark=mmeb_v2 out={d})")
        try:
            summ = mmeb_summary.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"runs: {path} is not an MMEB-V2 summary.json ({exc})") from None
        label = Path(d).name if Path(d).is_dir() else path.parent.name
        rows.append(GroupRow(label, mmeb_summary.columns_from_summary(summ), summ.partial, summ.version))
    return rows


def mmeb_table(rows: list[GroupRow]) -> tuple[list[str], list[list]]:
    """Header (run, then the columns any row has, leaderboard order) and rows; a missing value is ''."""
    present = [c for c in mmeb_summary.COLUMNS if any(c in r.values for r in rows)]
    header = ["run"] + present
    body = [[r.label + (" (partial)" if r.partial else "") + (f" [{r.version}]" if r.version else "")]
            + [r.values.get(c, "") for c in present] for r in rows]
    return header, body


def mmeb_markdown(rows: list[GroupRow]) -> str:
    header, body = mmeb_table(rows)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def plot_groups(rows: list[GroupRow], path: str | Path, title: str) -> Path:
    """A grouped bar chart: one cluster per leaderboard column, one bar per run (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header, body = mmeb_table(rows)
    columns = header[1:]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(columns) * max(1, len(rows)) ** 0.5 + 2), 4))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(body):
        xs = [j + i * width for j, v in enumerate(row[1:]) if v != ""]
        ys = [v for v in row[1:] if v != ""]
        ax.bar(xs, ys, width, label=row[0], color=f"C{i % 10}")
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(columns))], columns, rotation=45, ha="right")
    ax.set_ylabel("score (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    return save_png(fig, path)
