"""``embedkit compare``: the runs of one MLflow experiment side by side.

    embedkit compare [experiment=NAME] [metric=val/p@1,train/loss ...] [tracking.uri=URI]
                     [--format markdown|csv] [--plot out.png]

See ``embedkit.tracking.compare`` for what the table holds and the defaults.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from embedkit.errors import UserError

USAGE = (
    "usage: embedkit compare [experiment=NAME] [metric=NAME[,NAME...]] [tracking.uri=URI] "
    "[--format markdown|csv] [--plot out.png]"
)

@dataclass
class Options:
    experiment: str | None = None
    metrics: list[str] = field(default_factory=list)
    uri: str | None = None
    format: str = "markdown"
    plot: str | None = None


def parse_args(args: list[str]) -> Options:
    opts = Options()
    words = list(args)
    while words:
        word = words.pop(0)
        if word.startswith("--"):
            flag, _, value = word[2:].partition("=")
            if flag not in ("format", "plot"):
                raise UserError(f"compare: unknown option --{flag}; {USAGE}")
            if not value:
                if not words:
                    raise UserError(f"compare: --{flag} needs a value; {USAGE}")
                value = words.pop(0)
            if flag == "format":
                if value not in ("markdown", "csv"):
                    raise UserError(f"compare: --format {value!r} is not accepted; choices: markdown, csv")
                opts.format = value
            else:
                opts.plot = value
            continue
        key, eq, value = word.partition("=")
        if not eq:
            raise UserError(f"compare: unexpected {word!r}; {USAGE}")
        if key == "experiment":
            opts.experiment = value
        elif key in ("metric", "metrics"):
            opts.metrics += [m.strip() for m in value.strip("[]").split(",") if m.strip()]
        elif key == "tracking.uri":
            opts.uri = value
        elif key == "format":
            opts.format = value
            if value not in ("markdown", "csv"):
                raise UserError(f"compare: format {value!r} is not accepted; choices: markdown, csv")
        elif key == "plot":
            opts.plot = value
        else:
            raise UserError(f"compare: unknown key {key!r}; accepted: experiment, metric, tracking.uri, format, plot")
    return opts


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

    opts = parse_args(args)
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
