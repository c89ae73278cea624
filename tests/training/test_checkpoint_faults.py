"""``AtomicLastCheckpoint`` under faults, without a process: a full disk at a checkpoint write stops with
one line naming the intact previous checkpoint (temporaries removed, ``last.ckpt`` unchanged); a stale
temporary a killed write left matches no checkpoint and is removed when training starts."""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from embedkit import fault_points
from embedkit.errors import UserError
from embedkit.files import temp_path
from embedkit.runs import RunDir
from embedkit.training.callbacks import AtomicLastCheckpoint


@pytest.fixture(autouse=True)
def fresh_counts():
    fault_points.reset()  # a plan's reach counts last as long as its process


class Trainer(SimpleNamespace):
    """What ``AtomicLastCheckpoint.save`` asks of a trainer, on one process."""

    def __init__(self, step: int):
        super().__init__(global_step=step, is_global_zero=True, world_size=1, max_steps=100,
                         strategy=SimpleNamespace(barrier=lambda: None))

    def save_checkpoint(self, path, weights_only=False):
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # as Lightning's checkpoint IO does
        Path(path).write_bytes(b"step %d" % self.global_step)


MODULE = SimpleNamespace(diverged_at=None, trainer=None, parameters=lambda: [])


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    ckpts = AtomicLastCheckpoint(run, every=10)
    monkeypatch.delenv(fault_points.PLAN_ENV, raising=False)
    assert ckpts.save(Trainer(10), MODULE) == run.step_checkpoint(10)
    monkeypatch.setenv(fault_points.PLAN_ENV, "checkpoint_write:1:enospc")
    with pytest.raises(UserError) as info:
        ckpts.save(Trainer(20), MODULE)
    assert str(info.value) == (f"disk full writing {run.step_checkpoint(20)}; the previous checkpoint "
                               f"{run.step_checkpoint(10)} is intact; free space and resume with: "
                               f"embedkit fit resume={run.path}")
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["last.ckpt", "step-00000010.ckpt"]
    assert os.path.samefile(run.last_checkpoint, run.step_checkpoint(10))
    # the space freed, the next write goes through
    monkeypatch.delenv(fault_points.PLAN_ENV)
    assert ckpts.save(Trainer(20), MODULE) == run.step_checkpoint(20)
    assert run.last_checkpoint.read_bytes() == b"step 20"


def test_a_full_disk_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    monkeypatch.setenv(fault_points.PLAN_ENV, "checkpoint_write:1:enospc")
    with pytest.raises(UserError, match="no checkpoint was written before it; free space and run again"):
        AtomicLastCheckpoint(RunDir(tmp_path / "run"), every=10).save(Trainer(10), MODULE)


def test_a_stale_temporary_is_ignored_then_removed(tmp_path, monkeypatch):
    monkeypatch.delenv(fault_points.PLAN_ENV, raising=False)
    run = RunDir(tmp_path / "run")
    ckpts = AtomicLastCheckpoint(run, every=10)
    ckpts.save(Trainer(10), MODULE)
    stale = temp_path(run.step_checkpoint(20))  # a write killed before its rename
    stale.write_bytes(b"step 20")
    assert run.step_checkpoints() == [run.step_checkpoint(10)]
    assert run.newest_checkpoint() == run.last_checkpoint and run.last_checkpoint.read_bytes() == b"step 10"
    AtomicLastCheckpoint(run, every=10).on_train_start(Trainer(10), MODULE)
    assert not stale.exists() and run.step_checkpoints() == [run.step_checkpoint(10)]
