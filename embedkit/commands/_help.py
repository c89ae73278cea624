"""The text of ``--help``: option rows, defaults as they are written, and the config keys.

``help_row``/``show`` lay out one option and its default. ``config_help`` lists the config keys,
generated from ``config/schema.py``'s dataclasses: each key with its default and the comment written
beside it (or just above it) in the schema source, each section with its docstring. Used by the verbs
that compose the config (``fit``, ``config show``, ``eval``); it reads the schema only, so no
component (and no torch) is imported.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any, Literal

#: help lines wrap here; an option's help starts in this column
WIDTH, COLUMN = 100, 26
#: config keys are long: their help starts further right than a verb option's
KEY_COLUMN = 38

INTRO = [
    "config words:",
    "  recipe=NAME|path.yaml   a shipped recipe (embedkit recipes) or a YAML file (default: demo)",
    "  KEY=VALUE               set a config key; the value is read as YAML: true, [1,2], 1e-5, null",
    "  ~KEY                    remove a key from the recipe, so its default applies",
    "  COMPONENT=NAME          a component block (model.backbone, model.pooling, loss ...) replaced by that",
    "                          component with its defaults; COMPONENT.KEY=VALUE sets one of its keys",
    "",
    "  (embedkit config show [recipe=NAME] [KEY=VALUE ...] prints a resolved config)",
]


@functools.lru_cache(maxsize=1)
def schema_comments() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment on the field's line, else the comment lines just above it."""
    from embedkit.config import schema

    source = inspect.getsource(schema)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            text = comments.get(stmt.lineno) if not lines[stmt.lineno - 1].lstrip().startswith("#") else None
            if not text:
                above, n = [], stmt.lineno - 1
                while n in comments and lines[n - 1].lstrip().startswith("#"):
                    above.insert(0, comments[n])
                    n -= 1
                text = " ".join(above)
            out[(node.name, stmt.target.id)] = text
    return out


def config_keys(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(section, dotted key, help line) for every key of the schema under ``cls`` (default: the whole config)."""
    from embedkit.config import schema

    cls = cls or schema.Config
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if key == "recipe":
            continue  # set by the loader from recipe=
        section = prefix.rstrip(".") or "top level"
        if dataclasses.is_dataclass(hints[f.name]):
            out += config_keys(hints[f.name], key + ".")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if "component" in f.metadata:
            default = default["name"]
        out.append((section, f"{key}={show(default)}", _key_help(cls, f, hints[f.name], key)))
    return out


def _key_help(cls: type, f: dataclasses.Field, tp: Any, key: str) -> str:
    """The key's schema comment, its choices and its minimum."""
    from embedkit.config.schema import MINIMUMS

    parts = [schema_comments().get((cls.__name__, f.name), "")]
    if "component" in f.metadata:
        parts.insert(0, f"a {f.metadata['component']} component: {key}=NAME picks one with its defaults, "
                        f"{key}.KEY=VALUE sets one of its keys")
    choices = [typing.get_args(a) for a in (tp, *typing.get_args(tp)) if typing.get_origin(a) is Literal]
    if choices:
        parts.append("one of " + ", ".join(map(str, choices[0])))
    if key in MINIMUMS:
        parts.append(f">= {MINIMUMS[key]}")
    return "; ".join(p for p in parts if p)


def section_docs() -> dict[str, str]:
    """dotted section -> its dataclass docstring (the sections that have one)."""
    from embedkit.config import schema

    out, todo = {}, [(schema.Config, "")]
    while todo:
        cls, prefix = todo.pop()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            sub = hints[f.name]
            if dataclasses.is_dataclass(sub):
                if sub.__doc__ and not sub.__doc__.startswith(sub.__name__ + "("):
                    out[prefix + f.name] = " ".join(sub.__doc__.split())
                todo.append((sub, prefix + f.name + "."))
    return out


def config_help(prefixes: tuple[str, ...]) -> list[str]:
    """Help lines: the config words, then each key under one of ``prefixes`` ("" = all), by section."""
    sections: dict[str, list[str]] = {}
    for section, word, text in config_keys():
        key = word.partition("=")[0]
        if any(p in ("", key) or key.startswith(p + ".") for p in prefixes):
            sections.setdefault(section, []).append(help_row(word, text, KEY_COLUMN))
    lines = list(INTRO)
    lines += ["", "config keys (KEY=DEFAULT)" + ("" if prefixes == ("",) else
                                                ", those this verb reads; any other key is accepted and checked too")]
    docs = section_docs()
    for section, rows in sections.items():
        lines += ["", f"{section}:", *("  " + line for line in _wrap(docs.get(section, ""))), *rows]
    return lines


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH - 2, break_on_hyphens=False)


def show(value: Any) -> str:
    """A default as it is written on the command line: true, null, [30,100], 0.95."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}" if value else "{}"
    return str(value)


def help_row(word: str, text: str, column: int = COLUMN) -> str:
    """``  word      help``, the help wrapped under its column (a long word gets a line of its own)."""
    first = f"  {word}"
    body = textwrap.wrap(text, WIDTH - column, break_on_hyphens=False) or [""]
    pad = " " * column
    if len(first) >= column - 1:
        return "\n".join([first] + [pad + b for b in body]).rstrip()
    return "\n".join([first.ljust(column) + body[0]] + [pad + b for b in body[1:]]).rstrip()
