"""Dataset manifests (``data/mmeb/train.yaml``, ``eval.yaml``) from a checkout or an installed wheel.

The top-level ``data/mmeb/`` folder ships inside the wheel as the package ``embedkit.manifests``
(see pyproject.toml), the same way ``recipes/`` ships as ``embedkit.recipes``.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2] / "data" / "mmeb"


def manifest_path(name: str) -> Path:
    """The path of manifest ``name`` (``train.yaml`` or ``eval.yaml``)."""
    try:
        packaged = Path(str(importlib.resources.files("embedkit.manifests"))) / name
        if packaged.is_file():
            return packaged
    except ModuleNotFoundError:
        pass
    return _CHECKOUT / name
