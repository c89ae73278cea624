"""The ``embedkit`` command line. Heavy imports happen inside the verbs: ``--help`` answers fast.

This is the verb table: each verb is ``embedkit/commands/<verb>.py``'s ``main(args) -> int``. A
``UserError`` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys

USAGE = """usage: embedkit <verb> [recipe=NAME|path.yaml] [key=value ...] [~key ...]

verbs:
  fit            train (no recipe: the demo, a tiny VLM on drawn scenes, CPU, minutes)
  eval           MMEB evaluation: ckpt=PATH | model=DIR (export or sentence-transformers) data.eval.root=DIR
  data mmeb      convert MMEB-train to WebDataset shards: --src DIR --out DIR
  compare        runs side by side from MLflow: [experiment=NAME] [metric=...]
  config show    print the resolved config
  ui             the MLflow UI on 127.0.0.1 over runs/mlflow.db
  recipes        list the shipped recipes
  export         a run as a self-contained model folder: RUN_DIR|CKPT out=DIR [merge_lora=true]
  encode         embed a corpus: model=PATH input=FILE(.jsonl|.parquet) out=FILE(.npy|.parquet)
  mine           hard negatives with false-negative filtering: model=RUN_DIR shards=SRC out=DST num_negatives=K
  merge          merge runs of one base: RUN_A RUN_B ... out=DIR [method=average|slerp|ties] [weights=[..]]

examples:
  embedkit fit
  embedkit fit recipe=demo trainer.max_steps=3 run.dir=/tmp/run
  embedkit fit recipe=demo loss=matryoshka loss.inner=hardness_weighted
  embedkit config show recipe=demo model.pooling=mean
"""

#: each verb is the module embedkit/commands/<verb>.py, whose ``main(args) -> int`` runs it
VERBS = ("fit", "eval", "data", "compare", "ui", "config", "recipes", "export", "encode", "mine", "merge")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] in ("-V", "--version"):
        from embedkit.version import __version__

        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"embedkit: error: unknown verb {verb!r}; verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    from embedkit.errors import UserError

    try:
        return int(importlib.import_module(f"embedkit.commands.{verb}").main(rest) or 0)
    except UserError as exc:
        print(f"embedkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("embedkit: interrupted", file=sys.stderr)
        return 130
