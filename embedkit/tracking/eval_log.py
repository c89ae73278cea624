"""Evaluation results into MLflow: the run that trained the checkpoint, or a new ``eval-<run>`` run.

``log_eval(...)`` finds the training run by its name (and ``run.dir`` param) in its experiment
(``training_run.find_training_run``) and logs the metrics at the checkpoint's step, plus the summary
files as artifacts under ``eval/``; ``log_eval_result`` does it for an ``embedkit eval`` result.
"""

from __future__ import annotations

import time
from pathlib import Path


def log_eval_result(tracking: dict, provenance, result, recipe: str) -> str:
    """Log an evaluation (``eval.run.EvalResult``: metrics, files, artifact folder, eval root) of the
    model ``provenance`` describes, as the ``tracking`` section of the eval's config says; the run id.
    The training run is named by the model's training config; a model without one (a recipe's model,
    a sentence-transformers folder) gets a new ``eval-<name>`` run."""
    from embedkit.tracking.mlflow_setup import tracking_uri

    trained = provenance.config
    run = trained.get("run", {})
    source = Path(provenance.checkpoint or provenance.source or ".")
    name = run.get("name") or (f"eval-{recipe}" if provenance.kind == "config" else source.stem)
    return log_eval(
        tracking_uri(tracking), trained.get("tracking", {}).get("experiment") or tracking["experiment"],
        name, run.get("dir"),
        tags={"embedkit.eval.ckpt": str(source.resolve()), "embedkit.eval.root": result.root},
        metrics=result.metrics(), files=result.files(), step=provenance.step, artifact_path=result.folder,
    )


def log_eval(uri: str, experiment: str, run_name: str | None, run_dir: str | None, *, tags: dict[str, str],
             metrics: dict[str, float], files: list[Path], step: int = 0, artifact_path: str = "eval") -> str:
    """Log ``metrics`` (display names) and ``files`` (under ``artifact_path``) to the training run or a
    new eval run; its id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from embedkit.tracking.store import stored_name
    from embedkit.tracking.training_run import find_training_run

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
