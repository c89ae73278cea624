"""A rank that dies does not hang the others: the survivors stop with one line naming it.

``RankWatch`` is what a rank knows to name a lost peer: every rank's (rank, pid, host), gathered
once when the process group is up (one ``all_gather_object``), and, in the process that launched the
others, their ``Popen`` objects (so it can say how a child ended: "killed by SIGKILL"). After a
failure ``lost_line(exc)`` names the lost rank(s): a peer on this host whose process is gone (or
ended) died; when none did and the failure is a collective's (a timeout, a closed connection), the
others are named as out of contact: still running (one of them hangs) or, on other hosts, not to be
checked from here.

The strategies (``watched_strategy``): Lightning's DDP and ``ModelParallelStrategy`` (FSDP2) with
``timeout=`` (gloo's and NCCL's collective timeout, ``trainer.collective_timeout_s``), the peers
gathered in ``setup_environment``, and a launcher whose observer replaces Lightning's
``_ChildProcessObserver``: that one SIGKILLs the launching process (rank 0) within 5 s of any
child's non-zero exit, silently, before rank 0 can name the lost rank. ``RankObserver`` polls the
children every second; when one has died (ended other than the ways all ranks end together: 0, a
clean stop's 128 + signal, a diverged run's status) it gives the main thread ``grace`` seconds to
fail in its next collective and report (the usual way: a gloo peer's closed socket fails the
collective at once), then reports itself and ends the process: NCCL, or a rank 0 busy outside
collectives, would otherwise wait out the collective timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from embedkit.distributed.ranks import all_objects

#: exit status of a run stopped because a rank died (not 2: no user mistake; not a signal's 128 + n)
EXIT_RANK_LOST = 4


@dataclass(frozen=True)
class Peer:
    rank: int
    pid: int
    host: str

    def named(self, note: str = "") -> str:
        return f"rank {self.rank} (pid {self.pid} on host {self.host}{note})"


def how_it_ended(returncode: int) -> str:
    """``Popen.returncode`` in words: "killed by SIGKILL", "exited with status 1"."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` of this host no longer runs (gone, or a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        return state in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def is_collective_failure(exc: BaseException) -> bool:
    """A failure of torch.distributed itself (a timeout, a peer's closed connection), not of the model."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(w in text for w in ("gloo", "nccl", "timed out", "connection"))


def _death(peer: Peer, how: str) -> str:
    if how == "died":
        return f"{peer.named()} died"
    return f"{peer.named()} {'died' if how.startswith('killed') else 'ended'} ({how})"


class RankWatch:
    """What this rank knows about the others, to name a lost one (see the module).

    ``resume``: the words that resume the run, for the line (``embedkit fit resume=RUN``);
    ``agreed``: exit statuses that every rank reaches together (0, a clean stop's 143, ...): a
    launched rank that ends with one of them did not die.
    """

    def __init__(self, resume: str, timeout_s: int, agreed: tuple[int, ...] = (0,)):
        self.resume, self.timeout_s, self.agreed = resume, timeout_s, set(agreed) | {0}
        self.host = socket.gethostname()
        self.me: Peer | None = None
        self.peers: list[Peer] = []
        self.children: dict[int, subprocess.Popen] = {}  # global rank -> process (the launching process's)
        self._reported = threading.Lock()
        self.reported = False

    def gather(self) -> None:
        """Every rank's (rank, pid, host): one ``all_gather_object`` once the process group is up."""
        import torch.distributed as dist

        self.me = Peer(dist.get_rank(), os.getpid(), self.host)
        self.peers = [Peer(*p) for p in all_objects((self.me.rank, self.me.pid, self.me.host))]

    def ended(self, peer: Peer) -> str | None:
        """How ``peer`` ended ("died", "killed by SIGKILL", ...), None while it runs, cannot be checked
        or ended as all ranks end together (``agreed``)."""
        proc = self.children.get(peer.rank)
        if proc is not None:
            code = proc.poll()
            return None if code is None or code in self.agreed else how_it_ended(code)
        if peer.host == self.host and process_gone(peer.pid):
            return "died"
        return None

    def lost_line(self, exc: BaseException | None = None) -> str | None:
        """The line naming the lost rank(s), or None when no peer is known lost and ``exc`` is no
        collective's failure."""
        # before the peers are gathered (a rank that died while starting), the launched ones are known
        known = self.peers or [Peer(rank, proc.pid, self.host) for rank, proc in self.children.items()]
        others = [p for p in known if self.me is None or p.rank != self.me.rank]
        dead = [(p, how) for p in others if (how := self.ended(p)) is not None]
        if dead:
            named = "; ".join(_death(p, how) for p, how in dead)
            return f"{named}; the other ranks stopped. Resume with: embedkit fit {self.resume}"
        if exc is None or not is_collective_failure(exc) or not others:
            return None
        # a collective failed (timed out) and no peer is known dead: one of them hangs, or is out of reach
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        named = ", ".join(p.named(", still running" if p.host == self.host else ", which cannot be checked from here")
                          for p in others)
        return (f"lost contact with {named} (trainer.collective_timeout_s={self.timeout_s}: {first}); the other "
                f"ranks stopped. Resume with: embedkit fit {self.resume}")

    def report(self, line: str) -> bool:
        """Print ``line`` as the run's error, once per process (the observer and the main thread may
        both find it); False when it was already printed."""
        with self._reported:
            if self.reported:
                return False
            self.reported = True
        print(f"embedkit: error: {line}", file=sys.stderr, flush=True)
        return True

    def stop_children(self) -> None:
        """SIGKILL the launched ranks still running (a rank waiting on a dead peer may never return)."""
        for proc in self.children.values():
            if proc.poll() is None:
                proc.kill()


class RankObserver(threading.Thread):
    """In the launching process: a launched rank that died (ended other than ``watch.agreed``) ends
    this process too, with the line, when the main thread has not reported it within ``grace``
    seconds (see the module)."""

    def __init__(self, watch: RankWatch, poll: float = 1.0, grace: float = 10.0):
        super().__init__(daemon=True, name="embedkit-rank-observer")
        self.watch, self.poll, self.grace = watch, poll, grace

    def run(self) -> None:
        procs, agreed = list(self.watch.children.values()), self.watch.agreed
        while True:
            time.sleep(self.poll)
            codes = [p.poll() for p in procs]
            if any(c is not None and c not in agreed for c in codes):
                break
            if all(c is not None for c in codes):
                return  # every launched rank ended as the run decided
        time.sleep(self.grace)
        line = self.watch.lost_line()
        if line and self.watch.report(line):
            self.watch.stop_children()
            os._exit(EXIT_RANK_LOST)


def watched_strategy(kind: str, watch: RankWatch, **kwargs):
    """Lightning's ``DDPStrategy`` (``kind="ddp"``) or ``ModelParallelStrategy`` (``"fsdp2"``, with
    ``kwargs``) watching its ranks with ``watch``, collectives timing out after ``watch.timeout_s``."""
    cls = WatchedDDP if kind == "ddp" else WatchedModelParallel
    return cls(watch, timeout=timedelta(seconds=watch.timeout_s), **kwargs)


class _Watched:
    """Mixed into a Lightning strategy: the peers gathered at setup, the ranks launched by
    ``WatchedLauncher``."""

    def __init__(self, watch: RankWatch, **kwargs):
        super().__init__(**kwargs)
        self.watch = watch

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = WatchedLauncher(self.watch, self.cluster_environment, self.num_processes,
                                             self.num_nodes)

    def setup_environment(self) -> None:
        super().setup_environment()
        self.watch.gather()


class WatchedDDP(_Watched, DDPStrategy):
    pass


class WatchedModelParallel(_Watched, ModelParallelStrategy):
    pass


class WatchedLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher (rank 0 re-runs the command for the other local ranks) with
    ``RankObserver`` in place of Lightning's child-process observer."""

    def __init__(self, watch: RankWatch, *args):
        super().__init__(*args)
        self.watch = watch

    def launch(self, function, *args, trainer=None, **kwargs):
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            first = self.cluster_environment.node_rank() * self.num_processes
            self.watch.children = {first + i + 1: p for i, p in enumerate(self.procs)}
            RankObserver(self.watch).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)
