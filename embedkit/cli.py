"""The ``embedkit`` command line. Heavy imports happen inside the verbs: ``--help`` answers fast.

Each verb is a function ``main(args: list[str]) -> int`` in the module that owns it; a
``UserError`` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys

USAGE = """usage: embedkit <verb> [recipe=NAME|path.yaml] [key=value ...] [~key ...]

verbs:
  fit            train (no recipe: the demo, a tiny VLM on drawn scenes, CPU, minutes)
  eval           MMEB evaluation of a checkpoint: ckpt=PATH data.eval.root=DIR
  data mmeb      convert MMEB-train to WebDataset shards: --src DIR --out DIR
  compare        runs side by side from MLflow: [experiment=NAME] [metric=...]
  config show    print the resolved config
  ui             the MLflow UI on 127.0.0.1 over runs/mlflow.db
  recipes        list the shipped recipes

examples:
  embedkit fit
  embedkit fit recipe=demo trainer.max_steps=3 run.dir=/tmp/run
  embedkit fit recipe=demo loss=matryoshka loss.inner=hardness_weighted
  embedkit config show recipe=demo model.pooling=mean
"""

#: verb -> "module:function"; the function takes the remaining words and returns an exit code
VERBS = {
    "fit": "embedkit.training.fit:main",
    "eval": "embedkit.eval.run:main",
    "data": "embedkit.data.mmeb:main",
    "compare": "embedkit.tracking.compare:main",
    "ui": "embedkit.tracking.ui:main",
    "config": "embedkit.cli:config_main",
    "recipes": "embedkit.cli:recipes_main",
}


def config_main(args: list[str]) -> int:
    from omegaconf import OmegaConf

    from embedkit.config.loader import compose
    from embedkit.errors import UserError

    if not args or args[0] != "show":
        raise UserError("usage: embedkit config show [recipe=NAME] [key=value ...]")
    print(OmegaConf.to_yaml(compose(args[1:])), end="")
    return 0


def recipes_main(args: list[str]) -> int:
    from embedkit.config.loader import available_recipes

    print("\n".join(available_recipes()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] in ("-V", "--version"):
        from embedkit import __version__

        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"embedkit: error: unknown verb {verb!r}; verbs: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    from embedkit.errors import UserError

    module, func = VERBS[verb].split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except UserError as exc:
        print(f"embedkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("embedkit: interrupted", file=sys.stderr)
        return 130
