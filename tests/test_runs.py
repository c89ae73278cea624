"""RunDir: the run directory's layout in one place; newest checkpoint, saved config, of_checkpoint; the
one-fit lock; the newest checkpoint that reads."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embedkit.errors import UserError
from embedkit.runs import RunDir, checkpoint_problem
from tests.helpers.cli import REPO


def test_newest_checkpoint_prefers_last_then_highest_step(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.newest_checkpoint() is None and not run.is_run()
    run.checkpoints_dir.mkdir(parents=True)
    for step in (20, 100, 40):
        run.step_checkpoint(step).write_bytes(b"x")
    assert run.newest_checkpoint() == run.step_checkpoint(100)
    run.last_checkpoint.write_bytes(b"x")
    assert run.newest_checkpoint() == run.last_checkpoint
    assert [p.name for p in run.step_checkpoints()] == ["step-00000020.ckpt", "step-00000040.ckpt",
                                                        "step-00000100.ckpt"]


def test_config_run_id_and_errors(tmp_path):
    run = RunDir(tmp_path / "r")
    with pytest.raises(UserError, match="not an embedkit run directory"):
        run.saved_config()
    with pytest.raises(UserError, match=r"model: .* \(no checkpoints/last.ckpt\)"):
        run.checkpoint("model")
    run.write_config("seed: 3\n")
    assert run.is_run() and run.saved_config() == {"seed": 3}
    assert run.mlflow_run_id() is None
    run.write_mlflow_run_id("abc")
    assert run.mlflow_run_id() == "abc"
    assert run.eval_dir() == run.path / "eval" and run.eval_dir("l1_d16") == run.path / "eval-l1_d16"


def test_of_checkpoint(tmp_path):
    run = RunDir(tmp_path / "r")
    assert RunDir.of_checkpoint(run.step_checkpoint(5)).path == run.path.resolve()
    assert RunDir.of_checkpoint(tmp_path / "loose.ckpt") is None


# --- one fit per run dir: the lock -------------------------------------------------------------------
def test_lock_refuses_a_second_holder_naming_pid_and_host_and_is_released_after(tmp_path):
    run = RunDir(tmp_path / "r")
    warnings = []
    with run.lock(warn=warnings.append):
        assert run.lock_path.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(UserError, match=rf"in use by another embedkit fit \(pid {os.getpid()} on host "
                                            rf"{re.escape(socket.gethostname())}\)") as e:
            with RunDir(run.path).lock(warn=warnings.append):
                pass
        assert "\n" not in str(e.value)
        assert run.lock_path.is_file()  # the refused one took nothing away
    assert not run.lock_path.exists() and warnings == []
    with pytest.raises(RuntimeError):  # released on errors too
        with run.lock(warn=warnings.append):
            raise RuntimeError("boom")
    assert not run.lock_path.exists()
    with run.lock(warn=warnings.append):
        pass
    assert warnings == []


def test_a_stale_lock_is_taken_over_with_one_warning(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.lock_path.write_text(f"999999999 {socket.gethostname()}\n")  # left by a holder that died
    warnings = []
    with run.lock(warn=warnings.append):
        assert run.lock_path.read_text().split()[0] == str(os.getpid())
    assert len(warnings) == 1 and "taking over" in warnings[0] and "pid 999999999" in warnings[0]
    assert not run.lock_path.exists()


HOLDER = """import os, sys, time
from embedkit.runs import RunDir
with RunDir(sys.argv[1]).lock():
    ready, started = os.pipe()
    child = os.fork()  # as a data loader worker is forked: it outlives a killed parent for a while
    if child == 0:
        os.write(started, b"x")  # running: the at-fork hook has closed this copy of the lock
        time.sleep(60)
        os._exit(0)
    os.read(ready, 1)  # a child not yet scheduled still holds its copy (a race under load, not the case here)
    print(child, flush=True)
    time.sleep(60)
"""


def test_the_kernel_frees_the_lock_of_a_killed_holder_though_its_forked_child_lives(tmp_path):
    run = RunDir(tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run.path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = None
    try:
        child = int(holder.stdout.readline())
        with pytest.raises(UserError, match=rf"pid {holder.pid} on host"):
            with run.lock(warn=pytest.fail):
                pass
        holder.kill()
        holder.wait()
        warnings = []
        with run.lock(warn=warnings.append):  # SIGKILL left the file; its flock went with the process
            pass
        assert len(warnings) == 1 and f"pid {holder.pid}" in warnings[0]
    finally:
        holder.kill()
        holder.wait()
        if child:
            os.kill(child, signal.SIGKILL)


# --- the newest checkpoint that reads --------------------------------------------------------------
def _checkpoints(run: RunDir, steps=(20, 40)) -> None:
    run.checkpoints_dir.mkdir(parents=True)
    for step in steps:
        torch.save({"global_step": step, "state_dict": {"w": torch.randn(64, 64)}}, run.step_checkpoint(step))
    os.link(run.step_checkpoint(steps[-1]), run.last_checkpoint)  # as link_atomic leaves it


def _cut(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_newest_good_checkpoint_passes_over_a_cut_one_with_one_warning(tmp_path):
    run = RunDir(tmp_path / "r")
    warnings = []
    assert run.newest_good_checkpoint(warn=warnings.append) is None  # nothing there: no checkpoint, no error
    _checkpoints(run)
    assert run.newest_good_checkpoint(warn=warnings.append) == run.last_checkpoint and warnings == []
    _cut(run.step_checkpoint(40))  # last.ckpt is the same file: cut too
    assert run.newest_good_checkpoint(warn=warnings.append) == run.step_checkpoint(20)
    assert len(warnings) == 1 and str(run.last_checkpoint) in warnings[0] and "step-00000020" in warnings[0]
    assert torch.load(run.step_checkpoint(20), weights_only=True)["global_step"] == 20


def test_newest_good_checkpoint_all_bad_is_one_line(tmp_path):
    run = RunDir(tmp_path / "r")
    _checkpoints(run)
    _cut(run.step_checkpoint(40))
    run.step_checkpoint(20).write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match=r"resume=.*: no readable checkpoint under .*step-00000020") as e:
        run.newest_good_checkpoint(warn=pytest.fail)
    assert "\n" not in str(e.value)


def test_checkpoint_problem_names_cut_and_foreign_files(tmp_path):
    good = tmp_path / "a.ckpt"
    torch.save({"w": torch.ones(3)}, good)
    assert checkpoint_problem(good) is None
    _cut(good)
    assert "truncated" in checkpoint_problem(good)
    (tmp_path / "b.ckpt").write_bytes(b"")
    assert checkpoint_problem(tmp_path / "b.ckpt")
