"""DataLoader workers leave stopping to the main process.

A scheduler's stop signal reaches every process of the job: ``timeout``, SLURM and a terminal's
Ctrl-C signal the whole process group, the DataLoader workers included. Left to their defaults the
workers die of it first (SIGTERM, SIGUSR1) or leave their loop (SIGINT's ``KeyboardInterrupt``), and
the main process's next batch fails with "DataLoader worker ... is killed by signal" before its own
clean stop (``training.callbacks.CleanStop``) can finish the optimizer step and write a checkpoint.

``WorkerSignals`` is the loaders' ``worker_init_fn``: in each worker it ignores SIGINT and the extra
stop signals, and takes SIGTERM away from torch's handler: SIGTERM is blocked in every thread of the
worker (threads started later inherit the mask) and one daemon thread waits for it with
``sigwaitinfo``, exiting only when the main process sent it (that is how the main process's
``w.terminate()`` ends a stuck worker, and how multiprocessing's exit handler ends the daemonic
workers it joins); a SIGTERM from anyone else is dropped. torch's own worker handler makes the same
distinction by the sender's pid (exit quietly when the parent sent it), but dies of anyone else's.

Then it seeds the worker's generators as Lightning's ``seed_everything(workers=True)`` would have
(Lightning adds its seeding only to a loader without a ``worker_init_fn``).

Limits: a signal that arrives before a worker has run its ``worker_init_fn`` (while the loader's
iterator is being created) still meets torch's handler; a process-group signal sent *by the main
process itself* (``os.killpg`` from the trainer) counts as the main process's and ends the workers.
"""

from __future__ import annotations

import os
import signal
import threading


class WorkerSignals:
    """``worker_init_fn`` of a DataLoader: the workers ignore the stop signals (see the module).

    ``extra``: names of further stop signals (``trainer.stop_signal``, e.g. ``"SIGUSR1"``);
    ``rank``: the global rank, for Lightning's per-worker seeding when ``seed`` is true.
    Built in the main process: its pid is the one whose SIGTERM ends a worker.
    """

    def __init__(self, extra: list[str] | tuple[str, ...] = (), rank: int = 0, seed: bool = False):
        self.extra = [str(name) for name in extra]
        self.rank = rank
        self.seed = seed
        self.main_pid = os.getpid()

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals(self.extra, self.main_pid)
        if self.seed:
            from lightning.fabric.utilities.seed import pl_worker_init_function

            pl_worker_init_function(worker_id, rank=self.rank)


def ignore_stop_signals(extra: list[str], main_pid: int) -> threading.Thread:
    """In this (worker) process: SIGINT and ``extra`` ignored, SIGTERM ends it only when ``main_pid``
    sent it. Returns the thread that waits for SIGTERM."""
    for signum in [signal.SIGINT] + [getattr(signal, name) for name in extra]:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    waiter = threading.Thread(target=_await_sigterm, args=(main_pid,), name="embedkit-sigterm", daemon=True)
    waiter.start()
    return waiter


def _await_sigterm(main_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == main_pid:
            os._exit(0)
