"""The component registry: backbones, pooling heads, losses and mining judges, each under a short name.

A component is a class (or factory) registered with ``@register(kind, name)``. Its config keys are
its keyword parameters that have defaults, with their annotations as types; parameters without a
default (``hidden_size`` for a pooling head, say) are supplied by the builder, not the config. So a
user's loss is configured exactly by its constructor:

    @register("loss", "my_loss")
    class MyLoss(Loss):
        def __init__(self, temperature: float = 0.05): ...

A component may define ``check_config(params: dict)`` (a static or class method) that raises
``ValueError("<param>: <why>")``; validation turns it into a one-line error naming the full key.
Checks that need builder context (``hidden_size``, ``embedding_dim``) live in the constructor and
raise the same ``ValueError("<param>: <why>")``; ``build`` names the full key for those.

Built-in components are discovered by importing every module of their package
(``embedkit/losses/*.py`` ...): adding a component touches one new file. A user's module is loaded
by ``plugins=[mypkg.losses]`` in the config or the ``embedkit.plugins`` entry-point group.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from embedkit.errors import ConfigError

#: kind -> the package whose modules hold the built-in components of that kind
KINDS: dict[str, str] = {
    "backbone": "embedkit.backbones",
    "pooling": "embedkit.pooling",
    "loss": "embedkit.losses",
    "judge": "embedkit.mining.judges",
}

#: kind -> where a block of that kind sits in the config (``build``'s default ``key``)
BLOCK_KEYS: dict[str, str] = {
    "backbone": "model.backbone",
    "pooling": "model.pooling",
    "loss": "loss",
    "judge": "judge",
}

ENTRY_POINT_GROUP = "embedkit.plugins"


@dataclass(frozen=True)
class Param:
    name: str
    annotation: Any
    default: Any


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    params: dict[str, Param]
    #: parameter name -> kind, for parameters that are themselves components (Matryoshka's inner)
    nested: dict[str, str] = field(default_factory=dict)

    def doc(self) -> str:
        return inspect.getdoc(self.factory) or ""


_registry: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
_loaded_builtins: set[str] = set()
_loaded_plugins: set[str] = set()


def register(kind: str, name: str, *, nested: dict[str, str] | None = None):
    """Class decorator: register ``factory`` as component ``name`` of ``kind``."""
    if kind not in _registry:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {', '.join(_registry)}")

    def decorate(factory):
        _registry[kind][name] = Component(kind, name, factory, _config_params(factory), dict(nested or {}))
        return factory

    return decorate


def _config_params(factory) -> dict[str, Param]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = typing.get_type_hints(target)
    params = {}
    for p in inspect.signature(target).parameters.values():
        if p.name == "self" or p.default is inspect.Parameter.empty:
            continue
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        params[p.name] = Param(p.name, hints.get(p.name, type(p.default)), p.default)
    return params


def _load_builtins(kind: str) -> None:
    if kind in _loaded_builtins:
        return
    _loaded_builtins.add(kind)
    package = importlib.import_module(KINDS[kind])
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{KINDS[kind]}.{info.name}")


def load_plugins(modules: list[str] = ()) -> None:
    """Import user modules that register components: ``plugins=[...]`` and the entry-point group."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value not in _loaded_plugins:
            _loaded_plugins.add(ep.value)
            ep.load()
    for module in modules:
        if module in _loaded_plugins:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"plugins: cannot import module {module!r} ({exc})") from None
        _loaded_plugins.add(module)


def choices(kind: str) -> list[str]:
    _load_builtins(kind)
    return sorted(_registry[kind])


def get(kind: str, name: str, *, key: str | None = None) -> Component:
    """The component ``name`` of ``kind``; a ConfigError naming ``key`` and the choices otherwise."""
    _load_builtins(kind)
    try:
        return _registry[kind][name]
    except KeyError:
        where = key or kind
        raise ConfigError(
            f"{where}: unknown {kind} {name!r}; choices: {', '.join(choices(kind))}"
        ) from None


def build(kind: str, block: dict[str, Any], *, key: str | None = None, **context: Any) -> Any:
    """Instantiate the component described by a validated block ``{name: ..., **params}``.

    ``key`` is where the block sits in the config (default: ``BLOCK_KEYS[kind]``; a nested
    component's is ``<key>.<param>``, e.g. ``loss.inner``). A ``ValueError("<param>: <why>")`` from
    the component's constructor becomes a ``ConfigError("<key>.<param>: <why>")``; other errors
    (a backbone's ``UserError`` for a bad checkpoint, say) pass through unchanged.
    """
    key = key or BLOCK_KEYS[kind]
    component = get(kind, block["name"], key=f"{key}.name")
    kwargs = {}
    for param, value in block.items():
        if param == "name":
            continue
        if param in component.nested:
            value = build(component.nested[param], value, key=f"{key}.{param}", **context)
        kwargs[param] = value
    target = component.factory.__init__ if inspect.isclass(component.factory) else component.factory
    accepted = inspect.signature(target).parameters
    kwargs.update({k: v for k, v in context.items() if k in accepted and k not in kwargs})
    try:
        return component.factory(**kwargs)
    except ValueError as exc:
        param, sep, _ = str(exc).partition(":")
        where = f"{key}.{exc}" if sep and param in accepted else f"{key}: {exc}"
        raise ConfigError(where) from exc
