"""RunDir: the run directory's layout in one place; newest checkpoint, saved config, of_checkpoint."""

from __future__ import annotations

import pytest

from embedkit.errors import UserError
from embedkit.runs import RunDir


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
