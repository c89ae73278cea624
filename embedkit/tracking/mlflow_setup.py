"""MLflow wiring: the store, run params/tags/artifacts, and metric names MLflow accepts.

The store is ``store.resolve_uri``: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/runs/mlflow.db`` (current MLflow refuses its file store). Params are the
flattened resolved config with dotted keys; tags are the recipe, the git sha and the embedkit
version; the resolved config and the command-line overrides are artifacts (on a tracking server,
in the server's artifact store). Metric names keep ``/`` namespaces; MLflow refuses ``@``, so
``val/p@1`` is stored as ``val/p_at_1`` (``store.stored_name``, which ``compare`` shares).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from embedkit.config.flat import flatten
from embedkit.tracking.store import ENV_VAR, artifact_location, resolve_uri, stored_name


def tracking_uri(tracking: dict) -> str:
    """The store of the ``tracking`` section (``store.resolve_uri``), its folder created."""
    return resolve_uri(tracking["uri"], create=True)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class EmbedkitMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger, with ``@`` mapped (``stored_name``) instead of silently stripped,
    and the process environment left as it was found."""

    @property
    def experiment(self):
        # mlflow.set_tracking_uri (called by Lightning here) exports MLFLOW_TRACKING_URI for
        # subprocesses; undone, or the next fit of this process would take this run's store for the
        # user's choice (resolve_uri reads the variable) and every later child process would inherit it
        before = os.environ.get(ENV_VAR)
        try:
            return super().experiment
        finally:
            if before is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = before

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics({stored_name(k): v for k, v in metrics.items()}, step)


def make_logger(tracking: dict, recipe: str | None, run_name: str, run_id: str | None = None) -> EmbedkitMLFlowLogger:
    """The run's logger from the ``tracking`` section; tags: the recipe, git sha, version, ``tags``.
    ``run_id``: continue that MLflow run (a resumed fit) instead of starting one."""
    from embedkit.version import __version__

    tags = {"recipe": recipe or "", "git_sha": git_sha(), "embedkit_version": __version__,
            **{str(k): str(v) for k, v in tracking["tags"].items()}}
    uri = tracking_uri(tracking)
    return EmbedkitMLFlowLogger(experiment_name=tracking["experiment"], run_name=run_name,
                                tracking_uri=uri, tags=tags, artifact_location=artifact_location(uri), run_id=run_id)


@rank_zero_only
def mark_running(logger: EmbedkitMLFlowLogger) -> None:
    """A resumed run is running again (it was KILLED or FAILED when it stopped)."""
    logger.experiment.update_run(logger.run_id, status="RUNNING")


@rank_zero_only
def has_params(logger: EmbedkitMLFlowLogger) -> bool:
    """Whether the run already holds its params (a restarted run may have logged them before it was
    killed); None on the other ranks (which log nothing)."""
    return bool(logger.experiment.get_run(logger.run_id).data.params)


@rank_zero_only
def mark_ended(logger: EmbedkitMLFlowLogger, status: str) -> None:
    """The true end status (Lightning marks every fit that returns FINISHED): KILLED for a stop on a
    signal, FAILED for a run the non-finite guard stopped."""
    logger.experiment.set_terminated(logger.run_id, status)


@rank_zero_only
def log_run_inputs(logger: EmbedkitMLFlowLogger, cfg: dict, config_path: Path, overrides: list[str]) -> None:
    """Params (the flattened config) and the artifacts: the run's config file (``config_path``) and the overrides."""
    params = {k: param_value(v) for k, v in flatten(cfg).items()}
    logger.log_hyperparams(params)
    client, run_id = logger.experiment, logger.run_id
    client.log_artifact(run_id, str(config_path))
    client.log_text(run_id, "\n".join(overrides) + "\n", "overrides.txt")


def param_value(value):
    """A config leaf as an MLflow param: ``None`` as ``null``, an empty section as ``{}``."""
    if value is None:
        return "null"
    return "{}" if isinstance(value, dict) else value


#: the tag naming the mining manifest a run trained on (the manifest of ``embedkit mine``'s DST)
MINED_TAG = "embedkit.mined_manifest_sha256"


@rank_zero_only
def tag_mined_shards(logger: EmbedkitMLFlowLogger, train_shards: list[str]) -> None:
    """Tag the run with the sha256 of its training shards' mining manifest, when they were mined."""
    from embedkit.data.shard_set import ShardSet

    digest = ShardSet(train_shards).manifest_sha256("mining")
    if digest:
        logger.experiment.set_tag(logger.run_id, MINED_TAG, digest)
