"""A run dir under faults, through the CLI: a second fit on a held run dir exits 2 naming the holder; a
resume whose newest checkpoint was cut short (a full disk, a copy cut) continues from the previous one."""

import os
import socket

import torch

from embedkit.runs import RunDir
from tests.helpers.cli import SMALL_DEMO, run_cli

FAST = SMALL_DEMO + ["train.global_batch_size=8", "train.chunk_size=8", "data.train.task_batch_size=8",
                     "data.val.enabled=false", "trainer.progress=none", "trainer.val_check_interval=null",
                     "tracking.enabled=false", "trainer.checkpoint_every=10"]


def test_held_run_dir_refused_and_a_cut_newest_checkpoint_resumed_past(tmp_path):
    run = RunDir(tmp_path / "run")
    r = run_cli(["fit", *FAST, "trainer.max_steps=30", f"run.dir={run.path}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped" not in r.stderr  # a clean run says nothing of skipped samples
    assert not run.lock_path.exists()  # released at the end
    newest = run.step_checkpoint(30)
    assert os.path.samefile(newest, run.last_checkpoint)
    os.truncate(newest, os.path.getsize(newest) // 2)  # last.ckpt with it: one file

    with run.lock():  # another fit holds the run dir
        r = run_cli(["fit", f"resume={run.path}", "trainer.max_steps=40"], tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("embedkit: error: run.dir:") and f"pid {os.getpid()} on host {socket.gethostname()}" \
        in err[-1]

    r = run_cli(["fit", f"resume={run.path}", "trainer.max_steps=40"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if "unreadable checkpoint" in line]
    assert len(warnings) == 1 and "step-00000030.ckpt" in warnings[0], r.stderr[-3000:]
    assert f"(resuming from {run.step_checkpoint(20)})" in r.stdout
    assert torch.load(run.last_checkpoint, map_location="cpu", weights_only=False)["global_step"] == 40
