"""Where runs are stored and how names map into MLflow; light (no Lightning import) for ``compare``.

The store is ``sqlite:///<cwd>/runs/mlflow.db`` unless ``tracking.uri`` says otherwise (current
MLflow refuses its file store); a sqlite store keeps its artifacts beside the database. MLflow
refuses ``@`` in metric names, so ``val/p@1`` is stored as ``val/p_at_1``.
"""

from __future__ import annotations

from pathlib import Path


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'runs' / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database (``runs/mlartifacts``), not into ./mlruns."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None


def stored_name(name: str) -> str:
    """A metric name as MLflow stores it."""
    return name.replace("@", "_at_")


def display_name(name: str) -> str:
    return name.replace("_at_", "@")
