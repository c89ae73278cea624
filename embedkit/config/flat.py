"""A nested config as one level of dotted keys: ``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``.

The one spelling of a config key outside the tree: MLflow params, the keys a resume may change, the
model sections runs must share to be merged. An empty section is a leaf (its value ``{}``), so that
``tracking.tags: {}`` stays a key and two configs differ where one of them has tags.
"""

from __future__ import annotations

from typing import Any


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Every leaf of ``tree`` under its dotted key (``prefix`` in front of each); ``{}`` is a leaf."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
