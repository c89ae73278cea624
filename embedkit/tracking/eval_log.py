"""Evaluation results into MLflow: the run that trained the checkpoint, or a new ``eval-<run>`` run.

``log_eval(...)`` finds the training run by its name (and ``run.dir`` param) in its experiment and
logs the metrics at the checkpoint's step, plus the summary files as artifacts under ``eval/``.
"""

from __future__ import annotations

import time
from pathlib import Path


def find_training_run(client, experiment: str, run_name: str | None, run_dir: str | None = None):
    """The latest run of ``experiment`` named ``run_name`` (and with param ``run.dir``, if given)."""
    if not run_name or "'" in run_name or (run_dir and "'" in run_dir):
        return None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`mlflow.runName` = '{run_name}'"
    if run_dir:
        query += f" and params.`run.dir` = '{run_dir}'"
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=query,
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def log_eval(uri: str, experiment: str, run_name: str | None, run_dir: str | None, *, tags: dict[str, str],
             metrics: dict[str, float], files: list[Path], step: int = 0, artifact_path: str = "eval") -> str:
    """Log ``metrics`` (display names) and ``files`` (under ``artifact_path``) to the training run or a
    new eval run; its id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from embedkit.tracking.store import stored_name

    client = MlflowClient(tracking_uri=uri)
    run = find_training_run(client, experiment, run_name, run_dir)
    if run is not None:
        run_id = run.info.run_id
    else:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=f"eval-{run_name}", tags={"embedkit.kind": "eval"}).info.run_id
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(stored_name(k), float(v), now, step) for k, v in metrics.items()])
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    if run is None:
        client.set_terminated(run_id)
    return run_id
