"""The MLflow run that trained a run dir: found once, for ``embedkit eval`` and ``embedkit export``.

A run is found by its name (``run.name``) and, when given, its ``run.dir`` param, latest first, in
its experiment. ``training_run_record(config, run)`` looks in the store of the run's own ``tracking``
section: ``tracking.uri``, else the default ``sqlite:///<cwd>/runs/mlflow.db``, or the ``mlflow.db``
beside the run dir (where the default store sits when the run was trained from the directory holding
``runs/``); it keeps each metric's latest value (``val/p@1``, ``eval/<dataset>/p@1``, ``train/loss``).

Nothing here fails its caller: tracking off, a store or run that cannot be found, or a store that
cannot be read gives a ``note`` instead. ``mlflow`` is imported only when the run's tracking was on
and a store exists.
"""

from __future__ import annotations

from embedkit.runs import RunDir
from embedkit.tracking.store import default_uri, is_sqlite, sqlite_path

STORE_FILE = "mlflow.db"


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


def candidate_stores(tracking: dict, run: RunDir | None) -> list[str]:
    """The stores to look in, most likely first: the configured one, else the default ones."""
    if tracking.get("uri"):
        return [str(tracking["uri"])]
    uris = [default_uri()]
    if run is not None:
        beside = f"sqlite:///{run.path.resolve().parent / STORE_FILE}"
        if beside not in uris:
            uris.append(beside)
    return uris


def store_exists(uri: str) -> bool:
    """A sqlite store exists when its file does (opening a missing one would create it); others are
    tried as they are."""
    return not is_sqlite(uri) or sqlite_path(uri).is_file()


def training_run_record(config: dict, run: RunDir | None) -> dict:
    """``{"mlflow": {"experiment", "run_id", "store"}, "metrics": {...}}`` of the run that trained with
    ``config`` in ``run``, or ``{"mlflow": {"experiment", "note": why}}``."""
    tracking = config.get("tracking") or {}
    names = config.get("run") or {}
    experiment = tracking.get("experiment") or "embedkit"
    if not tracking.get("enabled", True):
        return {"mlflow": {"experiment": experiment, "note": "tracking was off for this run (tracking.enabled=false)"}}
    found = lookup(tracking, experiment, names.get("name"), names.get("dir"), run)
    return {"mlflow": {"experiment": experiment, **found.pop("mlflow")}, **found}


def lookup(tracking: dict, experiment: str, name: str | None, run_dir, run: RunDir | None) -> dict:
    stores = [uri for uri in candidate_stores(tracking, run) if store_exists(uri)]
    if not stores:
        return {"mlflow": {"note": f"no MLflow store found ({', '.join(candidate_stores(tracking, run))})"}}
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        return {"mlflow": {"note": f"MLflow is not importable here ({exc})"}}
    from embedkit.tracking.store import display_name

    for uri in stores:
        try:
            found = find_training_run(MlflowClient(tracking_uri=uri), experiment, name,
                                      str(run_dir) if run_dir else None)
        except Exception as exc:  # noqa: BLE001 - a store we cannot read is a note, not a failure
            return {"mlflow": {"note": f"the MLflow store {uri} could not be read ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0] if str(exc) else ''})"}}
        if found is not None:
            metrics = {display_name(k): float(v) for k, v in found.data.metrics.items()}
            return {"mlflow": {"run_id": found.info.run_id, "store": uri}, "metrics": metrics}
    return {"mlflow": {"note": f"no run named {name!r} in experiment {experiment!r} of {', '.join(stores)}"}}
