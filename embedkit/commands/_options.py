"""One options grammar for every verb: each verb declares its options once, as a dataclass.

A verb module holds ``VERB = Verb(name, summary, Options)``; each field of ``Options`` is one option,
made by ``option(default, help, ...)``. ``VERB.parse(words)`` returns an ``Options`` instance;
``VERB.help()`` is ``embedkit VERB --help``, generated from the same declaration. The words:

- ``key=value``: the value is read as YAML (as config overrides are: ``true``, ``[1,2]``, ``null``) and
  coerced to the field's type by ``config.schema.coerce``. Booleans: ``true``/``false`` (YAML's
  ``yes``/``no``, ``on``/``off`` too; ``1``/``0`` are numbers). Numbers: ``3``, ``0.5``, ``1e-5``.
  Lists: ``[a,b]``, ``[1,2]``, or ``a,b`` / one bare value. A ``str`` option takes its text as written.
  A repeated list option adds to the list; any other repeated option keeps the last value.
- a bare word fills the positional fields in order (a ``list`` positional takes every bare word left);
- ``PREFIX.NAME=VALUE`` (``prompt.query=...``) fills the ``dict`` field declared with ``prefix=PREFIX``;
- a verb that composes the config (``config=`` given) passes every other word (``recipe=``,
  ``key=value``, ``~key``) through, in its ``overrides`` field, to ``config.loader.compose``;
- ``--name value`` / ``--name=value`` only where the verb keeps its old flags (``dash_flags``).

Every mistake is one ``UserError`` line naming the option and what it accepts (exit 2). Range checks
are declared (``minimum=``/``maximum=``); rules across options live in the dataclass's
``__post_init__``. This module imports nothing heavy: ``embedkit --help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, Union

from embedkit.commands._help import config_help, help_row, show
from embedkit.errors import ConfigError, UserError


def option(default: Any = MISSING, help: str = "", *, key: str | None = None, metavar: str | None = None,
           minimum: float | None = None, maximum: float | None = None, positional: bool = False,
           prefix: str | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A dataclass field that is one command-line option.

    ``default``: MISSING makes the option required (a list or dict default is copied per parse).
    ``key``: its spelling on the command line when that is not the field name (``tracking.uri``).
    ``metavar``: the value's name in the help (default: from the type). ``minimum``/``maximum``: a
    number's range (each item's, for a list). ``positional``: filled by bare words. ``prefix``: a dict
    field filled by ``PREFIX.NAME=VALUE`` words. ``aliases``: other accepted spellings of ``key``.
    """
    meta = {"help": help, "key": key, "metavar": metavar, "minimum": minimum, "maximum": maximum,
            "positional": positional, "prefix": prefix, "aliases": aliases}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def config_words(help: str = "recipe=NAME|path.yaml, key=value, ~key: the config (keys below)") -> Any:
    """The field of a config-composing verb that receives the words meant for the config loader."""
    return field(default_factory=list, metadata={"help": help, "config_words": True})


@dataclass
class ConfigOnly:
    """The options of a verb whose every word is a config word (``fit``)."""

    overrides: list[str] = config_words()


@dataclass
class NoOptions:
    """The options of a verb that takes none (``recipes``)."""


# -- one declared option -------------------------------------------------------------------------


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without ``None``, whether None is accepted)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True
    return tp, False


def describe(tp: Any, minimum: float | None = None) -> str:
    """What a value of type ``tp`` looks like, for error messages: 'a positive integer', 'one of a, b'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        item = args[0] if args else str
        if typing.get_origin(item) is Literal:
            choices = typing.get_args(item)
            return f"{describe(item)}, or a list of them, e.g. [{','.join(map(str, choices))}]"
        nouns = {int: "integers", float: "numbers", str: "words"}
        what = nouns.get(item, "values")
        example = {int: "[1,2]", float: "[0.5,0.5]"}.get(item, "[a,b]")
        return f"a list of {what}, e.g. {example}"
    if origin is dict:
        return "NAME=VALUE words"
    if tp is int:
        return "a positive integer" if minimum == 1 else "an integer"
    return {bool: "true or false", float: "a number", str: "text"}.get(tp, str(tp))


@dataclass
class Option:
    """One field of a verb's options dataclass, as the parser sees it."""

    name: str  # the dataclass field
    key: str  # the command-line spelling
    tp: Any  # its resolved annotation
    default: Any  # MISSING for a required option
    meta: dict

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def base(self) -> Any:
        return _strip_optional(self.tp)[0]

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.base) is list

    @property
    def metavar(self) -> str:
        if self.meta.get("metavar"):
            return self.meta["metavar"]
        base, args = self.base, typing.get_args(self.base)
        if typing.get_origin(base) is Literal:
            return "|".join(map(str, args))
        if self.is_list:
            item = (typing.get_args(base) or (str,))[0]
            choices = typing.get_args(item) if typing.get_origin(item) is Literal else ()
            if choices:
                return f"[{'|'.join(map(str, choices))},...]"
            return {int: "[N,N]", float: "[X,X]"}.get(item, "[A,B]")
        return {bool: "true|false", int: "N", float: "X"}.get(base, "TEXT")

    def word(self) -> str:
        """How the option is written: ``out=DIR``, ``RUN_DIR|CKPT``, ``prompt.NAME=TEXT``."""
        if self.meta.get("positional"):
            return self.metavar + (" ..." if self.is_list else "")
        if self.meta.get("prefix"):
            return f"{self.meta['prefix']}.NAME={self.metavar}"
        return f"{self.key}={self.metavar}"

    def read(self, text: str | list[str]) -> Any:
        """The value of ``key=text`` (or of a flag's words), checked; UserError naming the option."""
        if isinstance(text, str) and text == "":
            raise UserError(f"{self.key}: give a value ({self.key}={self.metavar})")
        base, optional = _strip_optional(self.tp)
        if optional and text in ("null", "none", "None", "~"):
            return None
        value = text if isinstance(text, list) or base is str else _yaml(text)
        if self.is_list and not isinstance(value, list):
            value = [_yaml(part.strip()) for part in text.split(",") if part.strip()]
        try:
            value = coerce_value(value, base, self.key)
        except ConfigError:
            raise UserError(f"{self.key}: expected {describe(base, self.meta.get('minimum'))}, got {text!r}") from None
        self.check_range(value)
        return value

    def check_range(self, value: Any) -> None:
        low, high = self.meta.get("minimum"), self.meta.get("maximum")
        for v in value if isinstance(value, list) else [value]:
            if low is not None and v < low:
                raise UserError(f"{self.key}: must be >= {low}, got {v}")
            if high is not None and v > high:
                raise UserError(f"{self.key}: must be <= {high}, got {v}")


def _yaml(text: str) -> Any:
    from embedkit.config.loader import parse_value

    return parse_value(text)


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """``config.schema.coerce``, with a list's items coerced one by one (one message for the whole list)."""
    from embedkit.config.schema import coerce

    if typing.get_origin(tp) is list and isinstance(value, list):
        item = (typing.get_args(tp) or (Any,))[0]
        return [coerce(v, item, key) for v in value]
    return coerce(value, tp, key)


def declared(cls: type) -> list[Option]:
    """The options of dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default_factory is MISSING else f.default_factory()
        out.append(Option(f.name, f.metadata.get("key") or f.name, hints[f.name], default, dict(f.metadata)))
    return out


# -- a verb --------------------------------------------------------------------------------------


class Verb:
    """One verb's command line: its declared options, how to parse them, and its ``--help``.

    ``name``: the verb (``export``). ``summary``: one line for ``embedkit --help``. ``options``: the
    dataclass of its options. ``config``: for a verb that also composes the config, the dotted key
    prefixes its help lists (``("",)``: every key); it needs a ``config_words()`` field.
    ``words``: more (word, help) pairs its help lists (words a later step reads, e.g. ``fit``'s
    ``resume=RUN_DIR``). ``dash_flags``: None, ``"alias"`` (``--format x`` = ``format=x``) or
    ``"deprecated"`` (the same, with one line on stderr).
    """

    def __init__(self, name: str, summary: str, options: type | None = None, *,
                 config: tuple[str, ...] | None = None, words: tuple[tuple[str, str], ...] = (),
                 dash_flags: str | None = None):
        options = options or (NoOptions if config is None else ConfigOnly)
        self.name, self.summary, self.options, self.config = name, summary, options, config
        self.words, self.dash_flags = words, dash_flags

    # -- declaration views

    def declared(self) -> list[Option]:
        return declared(self.options)

    def by_key(self) -> dict[str, Option]:
        out = {}
        for opt in self.declared():
            if not (opt.meta.get("positional") or opt.meta.get("prefix") or opt.meta.get("config_words")):
                out.update({k: opt for k in (opt.key, *opt.meta.get("aliases", ()))})
        return out

    def positionals(self) -> list[Option]:
        return [o for o in self.declared() if o.meta.get("positional")]

    def title(self) -> str:
        """``data mmeb``: the verb and the one word its first positional accepts, if it is fixed."""
        first = self.positionals()[:1]
        if first and typing.get_origin(first[0].base) is Literal and len(typing.get_args(first[0].base)) == 1:
            return f"{self.name} {typing.get_args(first[0].base)[0]}"
        return self.name

    def required_words(self) -> list[str]:
        return [o.word() for o in self.declared() if o.required and not self.fixed(o)]

    def fixed(self, opt: Option) -> bool:
        """Whether ``opt`` is the one-word positional the title already names (``mmeb`` of ``data mmeb``)."""
        return self.title() != self.name and opt.name == self.positionals()[0].name

    def accepted(self) -> str:
        """Every option's spelling, for 'unknown option' messages."""
        words = [o.word() if o.meta.get("prefix") else f"{o.key}=" for o in self.declared()
                 if not (o.meta.get("positional") or o.meta.get("config_words"))]
        return ", ".join(words) or "none"

    def usage(self) -> str:
        parts = [f"embedkit {self.title()}", *self.required_words()]
        if any(not (o.required or o.meta.get("config_words")) for o in self.declared()) or self.words:
            parts.append("[options]")
        if self.config is not None:
            parts.append("[recipe=NAME|path.yaml] [KEY=VALUE ...] [~KEY ...]")
        return " ".join(parts)

    # -- parsing

    def parse(self, args: list[str]) -> Any:
        """The options instance from the verb's words (``-h``/``--help`` are the verb table's)."""
        state = _Parse(self)
        words = list(args)
        while words:
            state.take(words.pop(0), words)
        opts = state.finish()
        state.warn_deprecated()  # after the checks: a mistake stays one line
        return opts

    # -- help

    def help(self) -> str:
        lines = [f"usage: {self.usage()}", "", self.summary]
        options = [o for o in self.declared() if not (o.meta.get("config_words") or self.fixed(o))]
        if options or self.words:
            lines += ["", "options:"]
            lines += [help_row(o.word(), _option_help(o)) for o in options]
            lines += [help_row(word, text) for word, text in self.words]
        if self.dash_flags:
            how = "kept as aliases" if self.dash_flags == "alias" else "still accepted for a release (deprecated)"
            lines += ["", f"--name VALUE / --name=VALUE: {how} for name=VALUE"]
        if self.config is not None:
            lines += ["", *config_help(self.config)]
        return "\n".join(lines) + "\n"


def _option_help(opt: Option) -> str:
    text = opt.meta.get("help", "")
    if opt.meta.get("aliases"):
        text += f" (also {', '.join(a + '=' for a in opt.meta['aliases'])})"
    if opt.required:
        return f"{text} (required)".strip()
    if opt.meta.get("prefix"):
        return text
    return f"{text} (default: {show(opt.default)})".strip()


class _Parse:
    """The state of one parse: values set so far, bare words, config words, deprecated flags seen."""

    def __init__(self, verb: Verb):
        self.verb, self.keys = verb, verb.by_key()
        self.options = verb.declared()
        self.values: dict[str, Any] = {}
        self.bare: list[str] = []
        self.config: list[str] = []
        self.flags: dict[str, str] = {}  # deprecated --flag -> the key= it stands for

    def take(self, word: str, following: list[str]) -> None:
        if word.startswith("--") and self.verb.dash_flags:
            return self.flag(word, following)
        key, eq, text = word.partition("=")
        if eq and key in self.keys:
            return self.set(self.keys[key], text)
        prefixed = self.prefixed(key) if eq else None
        if prefixed is not None:  # the NAME=VALUE words of a family keep their text as written
            self.values.setdefault(prefixed.name, {})[key[len(prefixed.meta["prefix"]) + 1:]] = text
        elif not eq and not word.startswith(("~", "-")) and len(self.bare) < self.positional_slots():
            self.bare.append(word)
        elif self.verb.config is not None:
            self.config.append(word)
        elif eq or word.startswith("-"):
            raise UserError(f"{self.verb.name}: unknown option {key!r}; accepted: {self.verb.accepted()}")
        else:
            raise UserError(f"{self.verb.name}: unexpected {word!r}; usage: {self.verb.usage()}")

    def positional_slots(self) -> float:
        slots = self.verb.positionals()
        return float("inf") if any(o.is_list for o in slots) else len(slots)

    def prefixed(self, key: str) -> Option | None:
        return next((o for o in self.options if o.meta.get("prefix") and key.startswith(o.meta["prefix"] + ".")
                     and len(key) > len(o.meta["prefix"]) + 1), None)

    def set(self, opt: Option, value: str | list[str]) -> None:
        parsed = opt.read(value)
        if opt.is_list and parsed is not None and isinstance(self.values.get(opt.name), list):
            parsed = self.values[opt.name] + parsed  # a repeated list option adds to the list
        self.values[opt.name] = parsed

    def flag(self, word: str, following: list[str]) -> None:
        """``--name value`` / ``--name=value`` (a list option: every following word up to the next option)."""
        name, eq, text = word[2:].partition("=")
        opt = self.keys.get(name.replace("-", "_"))
        if opt is None:
            raise UserError(f"{self.verb.name}: unknown option --{name}; accepted: {self.verb.accepted()}")
        if not eq:
            values = []
            while following and not following[0].startswith("-") and "=" not in following[0]:
                values.append(following.pop(0))
                if not opt.is_list:
                    break
            if not values:
                raise UserError(f"{self.verb.name}: --{name} needs a value ({opt.word()})")
            text = values if opt.is_list else values[0]
        self.flags[f"--{name}"] = f"{opt.key}="
        self.set(opt, text)

    def warn_deprecated(self) -> None:
        if self.flags and self.verb.dash_flags == "deprecated":
            verb = "is" if len(self.flags) == 1 else "are"
            print(f"embedkit {self.verb.title()}: {', '.join(self.flags)} {verb} deprecated (going in a later "
                  f"release); write {', '.join(self.flags.values())} instead", file=sys.stderr)

    def finish(self) -> Any:
        slots = self.verb.positionals()
        for opt in slots:
            if opt.is_list:
                taken, self.bare = list(self.bare), []
                if taken:
                    self.values[opt.name] = opt.read(taken)
            elif self.bare:
                self.values[opt.name] = opt.read(self.bare.pop(0))
        missing = [o for o in self.options if o.required and o.name not in self.values]
        if missing:
            raise UserError(f"{self.verb.name}: give {' '.join(o.word() for o in missing)} "
                            f"(usage: {self.verb.usage()})")
        for opt in self.options:
            if opt.meta.get("config_words"):
                self.values[opt.name] = self.config
        return self.verb.options(**self.values)
