"""Naming a lost rank (``distributed.watch``): how a process ended, which peers are gone, the one
line, the observer that replaces Lightning's, and the strategies ``embedkit fit`` builds. The
2-process run with a rank killed is tests/e2e/test_dead_rank.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from embedkit.distributed import watch as w


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _watch(children: dict | None = None, peers=None) -> w.RankWatch:
    rw = w.RankWatch("resume=/runs/r", timeout_s=30)
    rw.me = w.Peer(0, os.getpid(), rw.host)
    rw.peers = peers or [rw.me]
    rw.children = children or {}
    return rw


def test_how_a_process_ended():
    assert w.how_it_ended(-9) == "killed by SIGKILL"
    assert w.how_it_ended(-15) == "killed by SIGTERM"
    assert w.how_it_ended(1) == "exited with status 1"


def test_process_gone_sees_a_zombie_and_a_reaped_process():
    p = _sleeper()
    assert not w.process_gone(p.pid)
    p.kill()
    os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
    assert w.process_gone(p.pid)
    p.wait()
    assert w.process_gone(p.pid)


def test_the_line_names_a_killed_child_and_a_dead_peer():
    child, other = _sleeper(), _sleeper()
    try:
        rw = _watch({1: child})
        rw.peers = [rw.me, w.Peer(1, child.pid, rw.host), w.Peer(2, other.pid, rw.host)]
        assert rw.lost_line(RuntimeError("boom")) is None  # everyone alive and no collective failed
        child.kill()
        child.wait()
        assert rw.lost_line() == (f"rank 1 (pid {child.pid} on host {rw.host}) died (killed by SIGKILL); the other "
                                  "ranks stopped. Resume with: embedkit fit resume=/runs/r")
        other.kill()
        other.wait()
        line = rw.lost_line()
        assert f"; rank 2 (pid {other.pid} on host {rw.host}) died; the other ranks stopped" in line
    finally:
        for p in (child, other):
            p.kill()
            p.wait()


def test_live_peers_are_named_out_of_contact_only_after_a_collective_failed():
    rw = _watch()
    rw.peers = [rw.me, w.Peer(1, 4242, "elsewhere")]
    assert rw.lost_line(ValueError("a bug in the loss")) is None
    line = rw.lost_line(RuntimeError("[gloo] Timed out waiting 30000ms for recv operation to complete"))
    assert line.startswith("lost contact with rank 1 (pid 4242 on host elsewhere, which cannot be checked from here) "
                           "(trainer.collective_timeout_s=30: [gloo] Timed out")
    assert line.endswith("Resume with: embedkit fit resume=/runs/r")
    rw.peers = [rw.me, w.Peer(1, os.getppid(), rw.host)]  # alive on this host: it hangs
    line = rw.lost_line(RuntimeError("[gloo] Timed out waiting 30000ms for recv operation to complete"))
    assert line.startswith(f"lost contact with rank 1 (pid {os.getppid()} on host {rw.host}, still running) ")


def test_the_line_is_reported_once(capsys):
    rw = _watch()
    assert rw.report("rank 1 died") and not rw.report("rank 1 died")
    assert capsys.readouterr().err == "embedkit: error: rank 1 died\n"


def test_the_observer_reports_a_dead_child_and_ends_the_process(monkeypatch, capsys):
    child = _sleeper()
    rw = _watch({1: child})
    rw.peers = [rw.me, w.Peer(1, child.pid, rw.host)]
    ended = []
    monkeypatch.setattr(w.os, "_exit", lambda code: ended.append(code))
    child.send_signal(signal.SIGKILL)
    w.RankObserver(rw, poll=0.05, grace=0.05).run()
    assert ended == [w.EXIT_RANK_LOST]
    assert "rank 1 (pid" in capsys.readouterr().err


def test_the_observer_names_a_child_that_died_before_the_peers_were_gathered(monkeypatch, capsys):
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])  # e.g. a crash loading the model
    rw = w.RankWatch("resume=/runs/r", timeout_s=30)
    rw.children = {1: child}
    ended = []
    monkeypatch.setattr(w.os, "_exit", lambda code: ended.append(code))
    w.RankObserver(rw, poll=0.05, grace=0.05).run()
    assert ended == [w.EXIT_RANK_LOST]
    assert f"rank 1 (pid {child.pid} on host {rw.host}) ended (exited with status 1);" in capsys.readouterr().err


def test_the_observer_stays_quiet_when_the_main_thread_reported(monkeypatch, capsys):
    child = _sleeper()
    rw = _watch({1: child})
    rw.peers = [rw.me, w.Peer(1, child.pid, rw.host)]
    rw.report("said already")
    capsys.readouterr()
    ended = []
    monkeypatch.setattr(w.os, "_exit", lambda code: ended.append(code))
    child.kill()
    w.RankObserver(rw, poll=0.05, grace=0.05).run()
    assert ended == [] and capsys.readouterr().err == ""


@pytest.mark.parametrize("status", [0, 143])
def test_the_observer_ends_when_every_child_ended_as_the_run_decided(monkeypatch, status):
    child = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({status})"])
    child.wait()
    rw = _watch({1: child})
    rw.agreed = {0, 143}
    monkeypatch.setattr(w.os, "_exit", lambda code: pytest.fail("ended the process"))
    w.RankObserver(rw, poll=0.05, grace=0.05).run()


@pytest.mark.parametrize("strategy,devices,nodes,expected", [
    ("auto", 1, 1, "auto"), ("auto", 2, 1, "WatchedDDP"), ("auto", 1, 2, "WatchedDDP"), ("ddp", 2, 1, "WatchedDDP"),
    ("fsdp2", 2, 1, "WatchedModelParallel"), ("ddp_spawn", 2, 1, "ddp_spawn"), ("auto", "auto", 1, "auto")])
def test_fit_watches_ddp_and_fsdp2_with_the_configured_timeout(strategy, devices, nodes, expected):
    from embedkit.commands.fit import make_strategy
    from embedkit.config.loader import compose

    trainer = compose([f"trainer.strategy={strategy}", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}",
                       "trainer.collective_timeout_s=77", "train.global_batch_size=8"])["trainer"]
    made = make_strategy(trainer, "resume=/runs/r")
    if isinstance(made, str):
        assert made == expected
        return
    assert type(made).__name__ == expected
    assert made._timeout.total_seconds() == 77 and made.watch.resume == "resume=/runs/r"
    assert {0, 3, 130, 143} <= made.watch.agreed and 137 not in made.watch.agreed  # SIGKILL is a death


def test_the_timeout_key_has_a_sensible_default_and_a_minimum():
    from embedkit.config.loader import compose
    from embedkit.errors import ConfigError

    assert compose([])["trainer"]["collective_timeout_s"] == 900
    with pytest.raises(ConfigError, match="trainer.collective_timeout_s"):
        compose(["trainer.collective_timeout_s=0"])
