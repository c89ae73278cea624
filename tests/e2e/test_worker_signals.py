"""DataLoader workers and a signal to the whole process group: with ``WorkerSignals`` they ignore
SIGTERM (from anyone but their parent), SIGINT (Ctrl-C) and the extra stop signal and leave the
decision to the main process, and still end when the main process terminates them. The full fit
(SIGTERM to the group, exit 143, exact resume) is in tests/e2e/test_lifecycle.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.cli import REPO, cli_env

SCRIPT = REPO / "tests" / "helpers" / "scripts" / "worker_signals.py"


def _run(name: str, on: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), name, on], env=cli_env(), capture_output=True, text=True,
                          timeout=120, start_new_session=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_workers_ignore_a_group_signal_and_the_main_process_decides(name):
    r = _run(name, "on")
    assert r["got"] == [name]  # the main process got it once
    assert r["alive"] == [True, True] and r["error"] is None
    assert r["batches"] == 40  # every batch of both workers arrived
    assert r["shutdown_s"] < 30  # the main process's terminate still ends a stuck worker


def test_without_it_a_group_sigterm_kills_the_workers():
    r = _run("SIGTERM", "off")
    assert r["error"] is not None and "DataLoader worker" in r["error"]
