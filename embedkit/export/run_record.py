"""The MLflow record of the run an export comes from: its run id and the metrics it logged.

The run is looked up as ``embedkit eval`` finds it (``tracking.eval_log.find_training_run``: the
latest run of the experiment with the run's name and ``run.dir``), in the store of the run's own
``tracking`` section: ``tracking.uri``, else the default ``sqlite:///<cwd>/runs/mlflow.db``, or the
``mlflow.db`` beside the run dir (where the default store sits when the run was trained from the
directory holding ``runs/``). Each metric's latest value is kept (``val/p@1``, ``eval/<dataset>/p@1``
after ``embedkit eval``, ``train/loss``).

Nothing here fails an export: a run with tracking off, a store or run that cannot be found, or a
store that cannot be read gives a ``note`` for the model card instead. ``mlflow`` is imported only
when the run's tracking was on and a store exists.
"""

from __future__ import annotations

from pathlib import Path

SQLITE = "sqlite:///"


def candidate_stores(tracking: dict, ckpt: Path) -> list[str]:
    """The stores to look in, most likely first: the configured one, else the default ones."""
    from embedkit.tracking.store import default_uri

    if tracking.get("uri"):
        return [str(tracking["uri"])]
    uris = [default_uri()]
    beside = f"{SQLITE}{ckpt.resolve().parent.parent.parent / 'mlflow.db'}"
    if beside not in uris:
        uris.append(beside)
    return uris


def store_exists(uri: str) -> bool:
    """A sqlite store exists when its file does (opening a missing one would create it); others are
    tried as they are."""
    return not uri.startswith(SQLITE) or Path(uri[len(SQLITE):]).is_file()


def find(config: dict, ckpt: Path) -> dict:
    """``{"mlflow_run_id", "mlflow_store", "metrics"}`` of the training run, or ``{"mlflow_note": why}``."""
    tracking = config.get("tracking") or {}
    run = config.get("run") or {}
    experiment = tracking.get("experiment") or "embedkit"
    if not tracking.get("enabled", True):
        return {"mlflow_experiment": experiment, "mlflow_note": "tracking was off for this run (tracking.enabled=false)"}
    return {"mlflow_experiment": experiment, **lookup(tracking, experiment, run.get("name"), run.get("dir"), ckpt)}


def lookup(tracking: dict, experiment: str, name: str | None, run_dir, ckpt: Path) -> dict:
    stores = [uri for uri in candidate_stores(tracking, ckpt) if store_exists(uri)]
    if not stores:
        return {"mlflow_note": f"no MLflow store found ({', '.join(candidate_stores(tracking, ckpt))})"}
    try:
        from mlflow.tracking import MlflowClient

        from embedkit.tracking.eval_log import find_training_run
    except ImportError as exc:
        return {"mlflow_note": f"MLflow is not importable here ({exc})"}
    from embedkit.tracking.store import display_name

    for uri in stores:
        try:
            found = find_training_run(MlflowClient(tracking_uri=uri), experiment, name,
                                      str(run_dir) if run_dir else None)
        except Exception as exc:  # noqa: BLE001 - a store we cannot read is a note on the card, not a failed export
            return {"mlflow_note": f"the MLflow store {uri} could not be read ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''})"}
        if found is not None:
            metrics = {display_name(k): float(v) for k, v in found.data.metrics.items()}
            return {"mlflow_run_id": found.info.run_id, "mlflow_store": uri, "metrics": metrics}
    return {"mlflow_note": f"no run named {name!r} in experiment {experiment!r} of {', '.join(stores)}"}
