"""Where runs are stored and how names map into MLflow; light (no Lightning import) for ``compare``.

The store is found as MLflow finds it, in one place (``resolve_uri``): ``tracking.uri`` when it is
set, else the ``MLFLOW_TRACKING_URI`` environment variable (MLflow's own convention: a tracking
server such as ``http://mlflow:5000`` in docker/compose.yaml), else
``sqlite:///<cwd>/runs/mlflow.db`` (current MLflow refuses its file store). ``fit``, ``eval``,
``compare`` and ``ui`` all call it, so they read and write the same store. A sqlite store keeps
its artifacts beside the database; a server keeps them in its own artifact store. MLflow refuses
``@`` in metric names, so ``val/p@1`` is stored as ``val/p_at_1``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MLFLOW_TRACKING_URI"


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'runs' / 'mlflow.db'}"


def resolve_uri(uri: str | None = None, *, create: bool = False) -> str:
    """The tracking store: ``uri`` (the ``tracking.uri`` key) > ``$MLFLOW_TRACKING_URI`` > the default.

    ``create=True`` makes the folder of a sqlite database (a writer's need; readers leave it)."""
    uri = uri or os.environ.get(ENV_VAR, "").strip() or default_uri()
    if create and is_sqlite(uri):
        sqlite_path(uri).parent.mkdir(parents=True, exist_ok=True)
    return uri


def is_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database (``runs/mlartifacts``), not into ./mlruns;
    a server (``http://...``) decides itself (its ``--artifacts-destination``)."""
    if is_sqlite(uri):
        return str(sqlite_path(uri).parent / "mlartifacts")
    return None


def stored_name(name: str) -> str:
    """A metric name as MLflow stores it."""
    return name.replace("@", "_at_")


def display_name(name: str) -> str:
    return name.replace("_at_", "@")
