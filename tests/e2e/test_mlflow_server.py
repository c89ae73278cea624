"""A real ``mlflow server`` on 127.0.0.1 (as in docker/compose.yaml: sqlite backend, proxied artifacts):
``MLFLOW_TRACKING_URI`` alone sends a 6-step demo fit there, its training shards streamed over HTTP
with a connection cut mid-shard; the fit is stopped by SIGTERM after step 3 and continued with
``embedkit fit resume=RUN_DIR`` (the remote stream restored at its position): ONE server run, KILLED
in between and FINISHED at the end, with ``train/loss`` at the steps before and after the resume.
Params, ``train/loss`` and the config artifact read back with ``MlflowClient``; ``embedkit compare``
reads the same server. Two fit processes (stopped, resumed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from tests.helpers.cli import SMALL_DEMO, run_cli
from tests.helpers.http_shards import serve

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` in its own session, /health polled up to 60 s, stopped by its process group."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
         "--serve-artifacts", "--artifacts-destination", str(tmp / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {(tmp / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 60 s: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, tmp
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def fitted(server, tmp_path_factory):
    from embedkit.config.loader import compose
    from embedkit.data import demo

    url, _ = server
    work = tmp_path_factory.mktemp("fit-to-server")
    # the demo shards, drawn here (the fit's process shares EMBEDKIT_CACHE), served over HTTP
    root = demo.ensure_demo_shards(compose(["recipe=demo", *SMALL_DEMO])["data"]["demo"], log=lambda *a: None)
    with serve(root) as shards:
        shards.cut_at = 16384  # a few samples in: the fit reads only a part of each shard in 5 steps
        shards.drop["/demo_t2i/train-000000.tar"] = 1  # its first GET (the probe reads demo_i2t's)
        args = ["fit", "recipe=demo", f"trainer.max_steps={STEPS}", f"run.dir={work / 'run'}", "run.name=to-server",
                "tracking.experiment=server", "train.global_batch_size=8", "train.chunk_size=4", *SMALL_DEMO,
                "trainer.log_every_n_steps=1", "trainer.progress=log",
                f"data.train.shards={shards.url}/demo_{{i2t,t2i}}/train-000000.tar"]
        # stopped by a real SIGTERM after step STOP (a scheduler's pre-emption), then resumed
        out = run_cli(args, cwd=work, MLFLOW_TRACKING_URI=url, EMBEDKIT_TEST_SIGNAL_AFTER_BATCH=str(STOP))
        assert out.returncode == 143, out.stdout[-2000:] + out.stderr[-3000:]
        assert f"stopped at step {STOP}; resume with: embedkit fit resume={work / 'run'}" in out.stdout
        stopped = _server_runs(url)
        out = run_cli(["fit", f"resume={work / 'run'}"], cwd=work, MLFLOW_TRACKING_URI=url)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert "resuming from" in out.stdout
        requests = list(shards.requests)
        dropped = list(shards.dropped)
    return work, out, requests, dropped, stopped


STEPS, STOP = 6, 3


def _server_runs(url: str) -> list[tuple[str, str, dict[int, float]]]:
    """(run id, status, {step: train/loss}) of every run in the ``server`` experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("server")
    return [(r.info.run_id, r.info.status,
             {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train/loss")})
            for r in client.search_runs([exp.experiment_id])]


def test_fit_logs_to_the_server_named_by_the_environment(server, fitted):
    from mlflow import MlflowClient

    url, tmp = server
    work, _, _, _, _ = fitted
    assert not (work / "runs" / "mlflow.db").exists()  # nothing went to the default store
    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("server")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "to-server"
    assert run.data.params["trainer.max_steps"] == str(STEPS) and run.data.params["loss.name"] == "infonce"
    assert run.data.params["data.train.shards"].startswith("http://127.0.0.1:")
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert losses and all(m.value == m.value for m in losses)  # logged, not NaN
    config = yaml.safe_load(open(client.download_artifacts(run.info.run_id, "config.yaml", str(work))).read())
    assert config["run"]["name"] == "to-server" and config["trainer"]["max_steps"] == STEPS
    assert list((tmp / "artifacts").rglob("config.yaml"))  # proxied: stored by the server


def test_a_run_resumed_after_a_kill_continues_the_same_server_run(server, fitted):
    url, _ = server
    work, _, _, _, stopped = fitted
    ((run_id, status, before),) = stopped  # after the SIGTERM: one run, marked KILLED
    assert status == "KILLED" and (work / "run" / "mlflow_run_id").read_text().strip() == run_id
    assert max(before) < STOP <= max(before) + 1, sorted(before)  # logged up to the stop, not past it
    ((rid, status, losses),) = _server_runs(url)  # still one run, now FINISHED
    assert rid == run_id and status == "FINISHED"
    assert all(losses[s] == v for s, v in before.items())  # the steps before the resume, as they were
    after = sorted(s for s in losses if s > max(before))
    assert after == list(range(max(before) + 1, STEPS)), sorted(losses)  # and every step after it
    assert all(v == v for v in losses.values())


def test_training_shards_streamed_over_http_through_a_cut(fitted):
    _, _, requests, dropped, _ = fitted
    path = "/demo_t2i/train-000000.tar"
    assert dropped == [path]
    resumed = [rng for p, rng in requests if p == path and rng]
    assert resumed and resumed[0].startswith("bytes=")  # resumed at the byte already read


def test_compare_reads_the_server(server, fitted, capsys, monkeypatch):
    from embedkit.cli import main as cli

    url, _ = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    assert cli(["compare", "experiment=server", "metric=train/loss"]) == 0
    out = capsys.readouterr().out
    assert "to-server" in out and "train/loss" in out
