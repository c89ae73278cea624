"""The ``embedkit`` command line. Heavy imports happen inside the verbs: ``--help`` answers fast.

This is the verb table: each verb is ``embedkit/commands/<verb>.py``, with ``VERB`` (its options,
declared once: ``embedkit/commands/_options.py``) and ``main(args) -> int``. ``embedkit --help`` and
``embedkit VERB --help`` are generated from those declarations. A ``UserError`` anywhere becomes one
line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import io
import sys

#: each verb is the module embedkit/commands/<verb>.py: ``VERB`` declares its options, ``main(args) -> int`` runs it
VERBS = ("fit", "eval", "data", "compare", "ui", "config", "recipes", "export", "encode", "mine", "merge",
         "report", "teach")

EXAMPLES = """examples:
  embedkit fit
  embedkit fit recipe=demo trainer.max_steps=3 run.dir=/tmp/run
  embedkit fit recipe=demo loss=matryoshka loss.inner=hardness_weighted
  embedkit config show recipe=demo model.pooling=mean
  embedkit export --help
"""


def verb_module(verb: str):
    """``embedkit.commands.<verb>`` (light to import: its heavy imports are inside ``main``)."""
    return importlib.import_module(f"embedkit.commands.{verb}")


def usage() -> str:
    """The top-level help: one line per verb, from each verb's declaration."""
    lines = ["usage: embedkit <verb> [options]        embedkit <verb> --help: the verb's options, with defaults",
             "", "verbs:"]
    for verb in VERBS:
        decl = verb_module(verb).VERB
        required = " ".join(decl.required_words())
        lines.append(f"  {decl.title():<13}{decl.summary}" + (f": {required}" if required else ""))
    return "\n".join(lines) + "\n\n" + EXAMPLES


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
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
        module = verb_module(verb)
        if "-h" in rest or "--help" in rest:
            print(module.VERB.help(), end="")
            return 0
        return int(module.main(rest) or 0)
    except UserError as exc:
        print(f"embedkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("embedkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`embedkit recipes | head`): stop quietly, as Unix tools do
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not raise on the closed pipe."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass
