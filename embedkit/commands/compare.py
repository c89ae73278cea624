"""``embedkit compare``: the runs of one MLflow experiment side by side.

    embedkit compare [experiment=NAME] [metric=val/p@1,train/loss ...] [tracking.uri=URI]
                     [format=markdown|csv] [plot=out.png]   (--format/--plot: aliases)
    embedkit compare runs=OUT_A,OUT_B [format=markdown|csv] [plot=groups.png]

Runs with an MMEB-V2 summary also get the leaderboard's groups (a second table; with ``plot=``, a bar
chart ``<plot stem>_mmeb_v2.png``). ``runs=`` compares eval output folders by their
``mmeb_v2/summary.json`` instead, without an MLflow store.

See ``embedkit.tracking.compare`` for what the table holds and the defaults.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal, Optional

from embedkit.commands._options import Verb, option
from embedkit.errors import UserError


@dataclass
class CompareOptions:
    experiment: Optional[str] = option(None, "the MLflow experiment; null: the one with the newest run",
                                       metavar="NAME")
    metrics: list[str] = option([], "metrics to show (repeatable); empty: the experiment's main ones",
                                key="metric", aliases=("metrics",), metavar="[NAME,...]")
    uri: Optional[str] = option(None, "the MLflow store; null: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db",
                                key="tracking.uri", metavar="URI")
    format: Literal["markdown", "csv"] = option("markdown", "the table's format")
    plot: Optional[str] = option(None, "also draw the metrics' curves into this PNG (logged to MLflow)",
                                 metavar="FILE.png")
    runs: list[str] = option([], "eval output folders to compare by their MMEB-V2 summary (no MLflow store)",
                             metavar="[DIR,...]")


VERB = Verb("compare", "runs side by side from MLflow", CompareOptions, dash_flags="alias")


def _groups_text(rows, fmt: str) -> str:
    from embedkit.tracking.compare import mmeb_markdown, mmeb_table, to_csv

    return to_csv(*mmeb_table(rows)) if fmt == "csv" else mmeb_markdown(rows)


def _compare_dirs(opts) -> int:
    """``runs=``: the MMEB-V2 groups of eval output folders, table and optional bar chart."""
    from embedkit.tracking.compare import mmeb_rows_from_dirs, plot_groups

    rows = mmeb_rows_from_dirs(opts.runs)
    if opts.format == "markdown":
        print(f"MMEB-V2 groups, percent: {len(rows)} runs\n")
    print(_groups_text(rows, opts.format), end="")
    if opts.plot:
        print(f"plot: {plot_groups(rows, opts.plot, 'MMEB-V2 groups')}", file=sys.stderr)
    return 0


def _mmeb_groups(client, exp, runs, opts) -> None:
    """The MMEB-V2 groups of the runs that logged them (a second table, a bar chart beside ``plot``)."""
    from pathlib import Path

    from embedkit.tracking.compare import log_plot, mmeb_rows_from_runs, plot_groups

    rows = mmeb_rows_from_runs(runs)
    if not rows:
        return
    print(("\nMMEB-V2 groups, percent:\n\n" if opts.format == "markdown" else "\n") + _groups_text(rows, opts.format),
          end="")
    if opts.plot:
        target = Path(opts.plot).with_name(Path(opts.plot).stem + "_mmeb_v2.png")
        png = plot_groups(rows, target, f"experiment {exp.name}: MMEB-V2 groups")
        print(f"plot: {png} (logged to MLflow run {log_plot(client, exp.experiment_id, png, runs)})", file=sys.stderr)


def main(args: list[str]) -> int:
    opts = VERB.parse(args)
    if opts.runs:
        return _compare_dirs(opts)
    from embedkit.tracking.compare import (
        build_table,
        choose_metrics,
        list_runs,
        log_plot,
        open_store,
        pick_experiment,
        plot_curves,
        to_csv,
        to_markdown,
    )

    client = open_store(opts.uri)
    exp = pick_experiment(client, opts.experiment)
    runs = list_runs(client, exp.experiment_id)
    if not runs:
        raise UserError(f"experiment {exp.name!r} has no runs")
    metrics = choose_metrics(runs, opts.metrics)
    header, rows, curves = build_table(client, runs, metrics)
    text = to_csv(header, rows) if opts.format == "csv" else to_markdown(header, rows)
    if opts.format == "markdown":
        print(f"experiment {exp.name}: {len(runs)} runs\n")
    print(text, end="")
    if opts.plot:
        png = plot_curves(curves, opts.plot, f"experiment {exp.name}")
        run_id = log_plot(client, exp.experiment_id, png, runs)
        print(f"plot: {png} (logged to MLflow run {run_id})", file=sys.stderr)
    _mmeb_groups(client, exp, runs, opts)
    return 0
