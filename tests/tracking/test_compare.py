"""``embedkit compare`` on a temporary sqlite store, and ``embedkit ui`` answering on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from embedkit.cli import main as cli

REPO = Path(__file__).resolve().parents[2]

# (loss.name, val/p@1 at steps 0, 10, 20): infonce peaks at step 10, hardness_weighted ends best
RUNS = {
    "run-infonce": ("infonce", [0.10, 0.62, 0.55]),
    "run-hardness": ("hardness_weighted", [0.10, 0.48, 0.71]),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One store for the module (creating an MLflow sqlite schema takes seconds)."""
    from mlflow.tracking import MlflowClient

    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    old = client.create_experiment("old", artifact_location=str(tmp_path / "art"))
    client.set_terminated(client.create_run(old, run_name="ancient").info.run_id)
    exp = client.create_experiment("losses", artifact_location=str(tmp_path / "art"))
    for name, (loss, values) in RUNS.items():
        run_id = client.create_run(exp, run_name=name).info.run_id
        for k, v in {"loss.name": loss, "train.lr": "0.003", "seed": "0", "run.name": name,
                     "run.dir": f"runs/{name}"}.items():
            client.log_param(run_id, k, v)
        for step, value in zip((0, 10, 20), values):
            client.log_metric(run_id, "val/p_at_1", value, step=step)
            client.log_metric(run_id, "train/loss", 2.0 - value, step=step)
        client.set_terminated(run_id)
        time.sleep(0.01)  # distinct start times: the table is oldest first
    return uri


def run_cli(capsys, args) -> tuple[int, str, str]:
    code = cli(["compare", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_markdown_table_shows_the_differing_param_and_metrics(store, capsys):
    code, out, _ = run_cli(capsys, [f"tracking.uri={store}", "experiment=losses", "metric=val/p@1"])
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "run_id", "loss.name", "val/p@1 best", "val/p@1 final"]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert set(rows) == {"run-infonce", "run-hardness"}
    assert rows["run-infonce"][2:] == ["infonce", "0.62", "0.55"]
    assert rows["run-hardness"][2:] == ["hardness_weighted", "0.71", "0.71"]
    # same params (train.lr, seed) and the always-different run.name/run.dir are left out
    assert "train.lr" not in lines[0] and "run.dir" not in lines[0]


def test_csv_and_default_experiment_and_metrics(store, capsys):
    # no experiment: the most recently started run's experiment ("losses", not "old")
    code, out, _ = run_cli(capsys, [f"tracking.uri={store}", "--format", "csv"])
    assert code == 0
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == ["run", "run_id", "loss.name", "val/p@1 best", "val/p@1 final",
                        "train/loss best", "train/loss final"]
    by_run = {row[0]: row for row in table[1:]}
    assert set(by_run) == {"run-infonce", "run-hardness"}
    assert by_run["run-infonce"][2] == "infonce"
    assert float(by_run["run-infonce"][5]) == pytest.approx(2.0 - 0.62)  # loss: best is the lowest
    assert float(by_run["run-hardness"][6]) == pytest.approx(2.0 - 0.71)
    assert len(by_run["run-hardness"][1]) == 32  # full run id in csv


def test_plot_is_written_and_logged(store, tmp_path, capsys):
    png = tmp_path / "plots" / "curves.png"
    code, out, err = run_cli(capsys, [f"tracking.uri={store}", "experiment=losses", f"--plot={png}"])
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("losses")
    logged = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("embedkit.kind") == "compare"]
    assert len(logged) == 1
    assert [a.path for a in client.list_artifacts(logged[0].info.run_id, "compare")] == ["compare/curves.png"]
    # the compare run is not itself a row of the next comparison
    code, out, _ = run_cli(capsys, [f"tracking.uri={store}", "--format=csv"])
    assert {row[0] for row in list(csv.reader(io.StringIO(out)))[1:]} == {"run-infonce", "run-hardness"}


def test_user_errors_are_one_line(store, tmp_path, capsys):
    code, _, err = run_cli(capsys, [f"tracking.uri={store}", "experiment=nope"])
    assert code == 2 and "nope" in err and "losses, old" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, [f"tracking.uri={store}", "--format", "xml"])
    assert code == 2 and "markdown, csv" in err
    code, _, err = run_cli(capsys, [f"tracking.uri=sqlite:///{tmp_path / 'none.db'}"])
    assert code == 2 and "no MLflow store" in err
    assert not (tmp_path / "none.db").exists()


def test_metric_name_mapping_round_trips_and_is_legal_in_mlflow():
    from mlflow.utils.validation import _validate_metric_name

    from embedkit.tracking.store import display_name, stored_name

    for name in ("val/p@1", "eval/N24News/p@1", "train/loss", "eval/x/recall@10"):
        _validate_metric_name(stored_name(name))  # raises on a name MLflow refuses
        assert display_name(stored_name(name)) == name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_answers_on_localhost_and_stops_with_its_process_group(store, tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedkit", "ui", f"tracking.uri={store}", f"port={port}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        body, deadline = None, time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    body = (resp.status, resp.read())
                    break
            except OSError:
                time.sleep(0.5)
        assert body is not None, proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "no answer"
        assert body[0] == 200
        # the REST API sees the store we gave it
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=losses", timeout=5
        ) as resp:
            assert b'"losses"' in resp.read()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


def test_ui_rejects_bad_arguments(capsys):
    assert cli(["ui", "port=http"]) == 2
    assert "port" in capsys.readouterr().err


@pytest.mark.slow
def test_two_demo_runs_with_different_losses_side_by_side(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = [
        "recipe=demo", f"data.demo.cache_dir={tmp_path / 'cache'}", "data.demo.train_size=64",
        "data.demo.val_size=12", "train.global_batch_size=8", "train.chunk_size=8", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "data.train.num_workers=0",
        "tracking.experiment=e2e",
    ]  # fmt: skip
    assert cli(["fit", *common, "run.name=demo-infonce"]) == 0
    assert cli(["fit", *common, "run.name=demo-hardness", "loss=hardness_weighted"]) == 0
    capsys.readouterr()
    code, out, _ = run_cli(capsys, ["metric=val/p@1"])  # default store runs/mlflow.db, latest experiment
    assert code == 0 and "experiment e2e: 2 runs" in out
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "loss.name" in header and "val/p@1 best" in header and "val/p@1 final" in header
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}
    assert set(rows) == {"demo-infonce", "demo-hardness"}
    col = header.index("loss.name")
    assert rows["demo-infonce"][col] == "infonce" and rows["demo-hardness"][col] == "hardness_weighted"
    for row in rows.values():
        best, final = float(row[header.index("val/p@1 best")]), float(row[header.index("val/p@1 final")])
        assert 0.0 <= final <= best <= 1.0
