"""MLflow wiring: the store, run params/tags/artifacts, and metric names MLflow accepts.

The store is ``sqlite:///<cwd>/runs/mlflow.db`` unless ``tracking.uri`` says otherwise (current
MLflow refuses its file store). Params are the flattened resolved config with dotted keys; tags
are the recipe, the git sha and the embedkit version; the resolved config and the command-line
overrides are artifacts. Metric names keep ``/`` namespaces; MLflow refuses ``@``, so
``val/p@1`` is stored as ``val/p_at_1`` (``mlflow_metric_name``; ``compare`` maps the same way).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'runs' / 'mlflow.db'}"


def tracking_uri(cfg: dict) -> str:
    uri = cfg["tracking"]["uri"] or default_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database (``runs/mlartifacts``), not into ./mlruns."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "mlartifacts")
    return None


def mlflow_metric_name(name: str) -> str:
    return name.replace("@", "_at_")


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: "{}"}
    return {prefix[:-1]: cfg}


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class EmbedkitMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger, with ``@`` mapped instead of silently stripped (``p@1`` -> ``p1``)."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({mlflow_metric_name(k): v for k, v in metrics.items()}, step)


def make_logger(cfg: dict, run_name: str) -> EmbedkitMLFlowLogger:
    from embedkit import __version__

    tags = {"recipe": cfg["recipe"] or "", "git_sha": git_sha(), "embedkit_version": __version__,
            **{str(k): str(v) for k, v in cfg["tracking"]["tags"].items()}}
    uri = tracking_uri(cfg)
    return EmbedkitMLFlowLogger(experiment_name=cfg["tracking"]["experiment"], run_name=run_name,
                                tracking_uri=uri, tags=tags, artifact_location=artifact_location(uri))


@rank_zero_only
def log_run_inputs(logger: EmbedkitMLFlowLogger, cfg: dict, config_path: Path, overrides: list[str]) -> None:
    """Params (flattened config) and the artifacts: resolved config.yaml and the overrides."""
    params = {k: ("null" if v is None else v) for k, v in flatten(cfg).items()}
    logger.log_hyperparams(params)
    client, run_id = logger.experiment, logger.run_id
    client.log_artifact(run_id, str(config_path))
    client.log_text(run_id, "\n".join(overrides) + "\n", "overrides.txt")
