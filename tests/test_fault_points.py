"""Named fault points: a no-op without a plan, SIGKILL or a full disk at the planned reach, a trace."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from embedkit import fault_points
from embedkit.fault_points import fault_point, parse_plan


@pytest.fixture(autouse=True)
def fresh_counts():
    fault_points.reset()  # a plan's reach counts last as long as its process


def test_no_plan_no_effect_and_a_full_disk_at_the_planned_reach(monkeypatch, tmp_path):
    monkeypatch.delenv(fault_points.PLAN_ENV, raising=False)
    monkeypatch.setenv(fault_points.TRACE_ENV, str(tmp_path / "trace"))
    for _ in range(3):
        fault_point("checkpoint_write")
    monkeypatch.setenv(fault_points.PLAN_ENV, "train_batch:2:enospc")
    fault_point("train_batch")
    fault_point("checkpoint_write")  # not in the plan
    with pytest.raises(OSError) as info:
        fault_point("train_batch")
    assert info.value.errno == errno.ENOSPC
    fault_point("train_batch")  # once only
    assert (tmp_path / "trace").read_text().split() == ["checkpoint_write"] * 3 + [
        "train_batch", "checkpoint_write", "train_batch", "train_batch"]


def test_a_kill_is_a_sigkill_at_the_planned_reach(tmp_path):
    code = "from embedkit.fault_points import fault_point\nfor i in range(5):\n    print(i, flush=True)\n" \
           "    fault_point('encode_part')\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, fault_points.PLAN_ENV: "encode_part:3"})
    assert r.returncode == -signal.SIGKILL and r.stdout.split() == ["0", "1", "2"]


@pytest.mark.parametrize("bad", ["nowhere:1", "train_batch", "train_batch:0", "train_batch:x",
                                 "train_batch:1:explode"])
def test_a_malformed_plan_is_refused(bad):
    with pytest.raises(ValueError, match="EMBEDKIT_FAULT_PLAN: bad entry"):
        parse_plan(bad)
