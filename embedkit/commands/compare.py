"""``embedkit compare``: the runs of one MLflow experiment side by side.

    embedkit compare [experiment=NAME] [metric=val/p@1,train/loss ...] [tracking.uri=URI]
                     [format=markdown|csv] [plot=out.png]   (--format/--plot: aliases)

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


VERB = Verb("compare", "runs side by side from MLflow", CompareOptions, dash_flags="alias")


def main(args: list[str]) -> int:
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

    opts = VERB.parse(args)
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
    return 0
