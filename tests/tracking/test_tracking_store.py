"""One place finds the MLflow store: ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` > ``runs/mlflow.db``;
``fit`` (via ``tracking_uri``), ``compare`` and ``ui`` agree."""

from __future__ import annotations

import pytest

from embedkit.commands import ui
from embedkit.errors import UserError
from embedkit.tracking import compare
from embedkit.tracking.store import ENV_VAR, resolve_uri


def test_explicit_key_then_environment_then_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_uri(None) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv(ENV_VAR, "http://127.0.0.1:5999")
    assert resolve_uri(None) == "http://127.0.0.1:5999"
    assert resolve_uri("sqlite:///x.db") == "sqlite:///x.db"  # the explicit key wins
    monkeypatch.setenv(ENV_VAR, "  ")
    assert resolve_uri(None).endswith("runs/mlflow.db")  # blank is unset


def test_fit_uses_the_resolver(tmp_path, monkeypatch):
    from embedkit.tracking.mlflow_setup import tracking_uri

    db = tmp_path / "sub" / "m.db"
    monkeypatch.setenv(ENV_VAR, f"sqlite:///{db}")
    assert tracking_uri({"uri": None}) == f"sqlite:///{db}"
    assert db.parent.is_dir()  # a writer makes the folder
    assert tracking_uri({"uri": "http://h:1"}) == "http://h:1"


def test_compare_reads_the_environment_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV_VAR, f"sqlite:///{tmp_path / 'elsewhere.db'}")
    with pytest.raises(UserError, match="elsewhere.db"):
        compare.open_store(None)


def test_ui_on_a_database_from_the_environment_and_refuses_a_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV_VAR, f"sqlite:///{tmp_path / 'e.db'}")
    cmd = ui.command(["port=5123"])
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'e.db'}"
    monkeypatch.setenv(ENV_VAR, "http://mlflow:5000")
    with pytest.raises(UserError, match="serves its own UI: open http://mlflow:5000"):
        ui.command([])


def test_a_fit_leaves_the_environment_as_it_found_it(tmp_path, monkeypatch):
    """MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI; the next fit in this process (or a child
    process) must not take that for the user's choice."""
    import os

    from embedkit.tracking.mlflow_setup import EmbedkitMLFlowLogger

    monkeypatch.delenv(ENV_VAR, raising=False)
    logger = EmbedkitMLFlowLogger(experiment_name="e", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                                  artifact_location=str(tmp_path / "a"))
    assert logger.experiment is not None and logger.run_id
    assert ENV_VAR not in os.environ
    monkeypatch.setenv(ENV_VAR, "http://127.0.0.1:9")
    assert logger.experiment is not None and os.environ[ENV_VAR] == "http://127.0.0.1:9"
