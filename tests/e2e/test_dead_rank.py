"""A dead DDP rank does not hang the others: with 2 processes (gloo on CPU; Lightning's launcher
starts rank 1 by re-running the command), a rank that SIGKILLs itself after its 5th batch makes the
survivor exit soon after, well within ``trainer.collective_timeout_s``, with one line naming the lost
rank and the resume command; the resume from the last checkpoint equals the uninterrupted run.

Rank 1 killed: rank 0 (the launching process) names it and exits ``EXIT_RANK_LOST``. Rank 0 killed:
the launching process is gone (the shell sees SIGKILL); rank 1 names rank 0 and exits too."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from embedkit.distributed.watch import EXIT_RANK_LOST
from embedkit.runs import RunDir
from tests.helpers.cli import SMALL_DEMO, cli_env, run_cli

pytestmark = pytest.mark.slow

TIMEOUT_S = 120
COMMON = ["fit", *SMALL_DEMO, "train.global_batch_size=8", "train.chunk_size=4", "data.train.task_batch_size=4",
          "data.val.enabled=false", "train.lr=1e-3", "trainer.devices=2", "trainer.accelerator=cpu",
          "trainer.strategy=ddp", "trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.progress=log",
          "trainer.log_every_n_steps=1", "trainer.val_check_interval=null",
          f"trainer.collective_timeout_s={TIMEOUT_S}"]


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _timed_run(args, cwd, **env) -> tuple[int, list[tuple[float, str]], float]:
    """(exit status of the launching process, its stderr lines (and the ranks' it started) with the
    time each arrived, the time the last writer closed stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "embedkit", *args], cwd=cwd, env=cli_env(**env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[tuple[float, str]] = []

    def read():
        for line in proc.stderr:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    code = proc.wait(timeout=600)
    reader.join(timeout=600)  # until every rank has closed stderr
    return code, lines, time.monotonic()


def _at(lines, pattern: str) -> tuple[float, str]:
    found = [(t, ln) for t, ln in lines if re.search(pattern, ln)]
    assert len(found) == 1, "\n".join(ln for _, ln in lines[-40:])
    return found[0]


def test_a_killed_rank_stops_the_survivor_with_a_line_and_the_run_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    r = run_cli([*COMMON, f"run.dir={whole}", "tracking.enabled=false"], tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]

    for dead in (1, 0):
        cut = tmp_path / f"cut{dead}"
        code, lines, closed = _timed_run([*COMMON, f"run.dir={cut}", f"tracking.uri=sqlite:///{tmp_path / 'cut.db'}"],
                                         tmp_path, EMBEDKIT_TEST_KILL_RANK_AFTER_BATCH=f"{dead}:5")
        assert code == (EXIT_RANK_LOST if dead == 1 else -9), "\n".join(ln for _, ln in lines[-40:])
        killed_at, _ = _at(lines, rf"^test: rank {dead} sends itself SIGKILL$")
        said_at, said = _at(lines, r"^embedkit: error: ")
        assert re.fullmatch(rf"embedkit: error: rank {dead} \(pid \d+ on host \S+\) died"
                            + (r" \(killed by SIGKILL\)" if dead == 1 else "")
                            + rf"; the other ranks stopped\. Resume with: embedkit fit resume={re.escape(str(cut))}",
                            said), said
        assert said_at - killed_at < TIMEOUT_S / 4 and closed - killed_at < TIMEOUT_S / 4, (killed_at, said_at, closed)
        assert not any("Traceback" in ln for _, ln in lines), "\n".join(ln for _, ln in lines[-40:])
        assert {p.name for p in (cut / "checkpoints").iterdir()} >= {"step-00000004.ckpt", "last.ckpt"}

    cut = tmp_path / "cut1"
    r = run_cli(["fit", f"resume={cut}", "trainer.progress=none"], tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'cut.db'}")
    assert client.get_run(RunDir(cut).mlflow_run_id()).info.status == "FINISHED"  # the same MLflow run, continued


def test_a_hung_rank_stops_the_other_after_the_collective_timeout(tmp_path):
    """Rank 1 stops itself (SIGSTOP: alive, silent): rank 0 waits ``trainer.collective_timeout_s`` in
    its collective, then names rank 1, SIGKILLs it and exits."""
    timeout_s = 15
    cut = tmp_path / "hung"
    code, lines, closed = _timed_run([*COMMON, f"run.dir={cut}", "tracking.enabled=false",
                                      f"trainer.collective_timeout_s={timeout_s}"],
                                     tmp_path, EMBEDKIT_TEST_KILL_RANK_AFTER_BATCH="1:5:SIGSTOP")
    assert code == EXIT_RANK_LOST, "\n".join(ln for _, ln in lines[-40:])
    stopped_at, _ = _at(lines, r"^test: rank 1 sends itself SIGSTOP$")
    said_at, said = _at(lines, r"^embedkit: error: ")
    assert re.fullmatch(r"embedkit: error: lost contact with rank 1 \(pid \d+ on host \S+, still running\) "
                        rf"\(trainer\.collective_timeout_s={timeout_s}: .+\); the other ranks stopped\. "
                        rf"Resume with: embedkit fit resume={re.escape(str(cut))}", said), said
    assert timeout_s - 1 <= said_at - stopped_at < timeout_s + 30 and closed - stopped_at < timeout_s + 40
    assert {p.name for p in (cut / "checkpoints").iterdir()} >= {"step-00000004.ckpt"}
