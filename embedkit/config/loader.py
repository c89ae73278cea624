"""Recipes and the override grammar.

    embedkit fit recipe=NAME|path.yaml key=value ~key comp=NAME ...

- ``recipe=NAME`` looks for ``NAME.yaml`` among the shipped recipes (the top-level ``recipes/``
  folder of a checkout, which an installed wheel carries as ``embedkit.recipes``); a value ending in
  ``.yaml``/``.yml`` or holding a path separator is a file. No recipe means ``recipe=demo``.
- A recipe may build on another with ``base: other_recipe`` (merged depth-first, the child wins).
- ``key=value`` sets a dotted key; the value is read as YAML (``[64,128]``, ``true``, ``null``).
- ``loss=NAME`` (any component block: ``model.backbone``, ``model.pooling``, ``loss``,
  ``loss.inner`` ...) replaces the whole block with that component's defaults.
- ``~key`` removes a key, so its default applies.
"""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path
from typing import Any

import yaml

from embedkit.config import registry, schema
from embedkit.errors import ConfigError

DEFAULT_RECIPE = "demo"
_CHECKOUT_RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def recipe_dirs() -> list[Path]:
    dirs = []
    try:
        packaged = Path(str(importlib.resources.files("embedkit.recipes")))
        if packaged.is_dir():
            dirs.append(packaged)
    except ModuleNotFoundError:
        pass
    if _CHECKOUT_RECIPES.is_dir() and _CHECKOUT_RECIPES not in dirs:
        dirs.append(_CHECKOUT_RECIPES)
    return dirs


def available_recipes() -> list[str]:
    return sorted({p.stem for d in recipe_dirs() for p in d.glob("*.yaml")})


def find_recipe(ref: str) -> Path:
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ConfigError(f"recipe: file not found: {ref}")
        return path
    for d in recipe_dirs():
        if (d / f"{ref}.yaml").is_file():
            return d / f"{ref}.yaml"
    raise ConfigError(f"recipe: unknown recipe {ref!r}; choices: {', '.join(available_recipes())}")


def load_recipe(ref: str, _chain: tuple[str, ...] = ()) -> dict:
    """The recipe's mapping with its ``base:`` chain merged in (the child wins)."""
    path = find_recipe(ref)
    if str(path) in _chain:
        raise ConfigError(f"recipe: 'base' chain loops back to {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe: {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe: {path} must hold a mapping of keys")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = load_recipe(str(base), _chain + (str(path),))
    return merge(parent, data)


def merge(base: dict, over: dict) -> dict:
    """Deep merge; a component block whose name changes is replaced, not merged."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        old = out.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            if "name" in v and "name" in old and v["name"] != old["name"]:
                out[k] = copy.deepcopy(v)
            else:
                out[k] = merge(old, v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_args(args: list[str]) -> tuple[str, list[str]]:
    """(recipe reference, the other overrides) from command-line words."""
    recipe, rest = DEFAULT_RECIPE, []
    for arg in args:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return recipe, rest


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    for arg in overrides:
        if arg.startswith("~"):
            _remove(cfg, arg[1:])
            continue
        if "=" not in arg:
            raise ConfigError(f"{arg}: expected key=value or ~key")
        key, text = arg.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{arg}: expected key=value with a dotted key")
        value = parse_value(text)
        if isinstance(value, str) and component_kind_at(cfg, key) is not None:
            value = {"name": value}  # component shorthand: that component with its defaults
        parent = key.rpartition(".")[0]
        if key.endswith(".name") and isinstance(value, str) and component_kind_at(cfg, parent) is not None:
            old = _get(cfg, parent)
            if (old.get("name") if isinstance(old, dict) else old) != value:
                key, value = parent, {"name": value}  # a new component's name replaces the block (its keys differ)
        _set(cfg, key, value)
    return cfg


def component_kind_at(cfg: dict, key: str) -> str | None:
    """The component kind whose block sits at dotted ``key`` in ``cfg``, if any."""
    import typing

    cls: Any = schema.Config
    node: Any = cfg
    kind = None
    for part in key.split("."):
        if kind is not None:  # inside a component block: only nested components continue
            kind = _nested_kind(kind, node, part)
            if kind is None:
                return None
        else:
            field = _schema_field(cls, part)
            if field is None:
                return None
            kind = field.metadata.get("component")
            if kind is not None:
                default = field.default_factory()
                node = _as_block(node.get(part, default) if isinstance(node, dict) else default)
                continue
            cls = typing.get_type_hints(cls)[part]
        node = _as_block(node.get(part, {}) if isinstance(node, dict) else {})
    return kind


def _as_block(node: Any) -> Any:
    """A component given by its name alone (``loss: infonce``) as its block."""
    return {"name": node} if isinstance(node, str) else node


def _schema_field(cls: Any, name: str):
    """The schema dataclass ``cls``'s field ``name``, or None (not a dataclass, or no such field)."""
    import dataclasses

    if not dataclasses.is_dataclass(cls):
        return None
    return {f.name: f for f in dataclasses.fields(cls)}.get(name)


def _nested_kind(kind: str, block: Any, part: str) -> str | None:
    """The kind of the component nested at ``part`` of a ``kind`` block (``loss.inner``), or None."""
    name = block.get("name") if isinstance(block, dict) else None
    if name is None:
        return None
    try:
        return registry.get(kind, name).nested.get(part)
    except ConfigError:
        return None


def _set(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and component_kind_at(cfg, ".".join(parts[: i + 1])):
            child = {"name": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def _get(cfg: dict, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _remove(cfg: dict, key: str) -> None:
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(parts[-1], None)


def to_yaml(cfg: dict) -> str:
    """The config as YAML text (``config.yaml`` of a run, ``embedkit config show``)."""
    import json

    from omegaconf import OmegaConf

    # a JSON round trip makes plain containers of any mapping type (OmegaConf takes only dicts)
    return OmegaConf.to_yaml(json.loads(json.dumps(cfg)))


def compose(args: list[str]) -> dict:
    """Validated config (a plain dict) from command-line words such as ``recipe=demo a.b=1``."""
    recipe, overrides = split_args(args)
    raw = load_recipe(recipe)
    raw = apply_overrides(raw, overrides)
    raw["recipe"] = Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe
    return schema.validate(raw, overridden=overridden_keys(overrides))


def overridden_keys(overrides: list[str]) -> set[str]:
    """The dotted keys that ``key=value`` overrides set (``~key`` restores a default: not counted)."""
    return {arg.split("=", 1)[0] for arg in overrides if "=" in arg and not arg.startswith("~")}
