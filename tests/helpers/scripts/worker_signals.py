"""A 2-worker DataLoader that signals its own process group mid-epoch, as a scheduler or Ctrl-C would.

Usage: worker_signals.py SIGNAL on|off. The main process notes the signal and carries on; prints one
JSON line: batches read, signals the main process got, whether the workers were alive after the signal,
and how long shutting down a worker stuck in its dataset took. ``off``: torch's own worker handlers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from torch.utils.data import DataLoader, IterableDataset

from embedkit.data.workers import WorkerSignals


class Counting(IterableDataset):
    def __init__(self, n: int, stuck_after: int | None = None):
        self.n, self.stuck_after = n, stuck_after

    def __iter__(self):
        for i in range(self.n):
            time.sleep(60 if self.stuck_after is not None and i >= self.stuck_after else 0.01)
            yield i


def signal_group(name: str) -> None:
    code = f"import os, signal; os.killpg({os.getpgid(0)}, signal.{name})"
    subprocess.run([sys.executable, "-c", code], stderr=subprocess.DEVNULL, check=False)


def main(name: str, on: bool) -> dict:
    got: list[str] = []
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, lambda signum, frame: got.append(signal.Signals(signum).name))
    init = WorkerSignals(["SIGUSR1"]) if on else None
    loader = DataLoader(Counting(20), batch_size=None, num_workers=2, worker_init_fn=init)
    it, n, alive = iter(loader), 0, None
    pids = [w.pid for w in it._workers]
    try:
        for _ in it:
            n += 1
            if n == 5:
                signal_group(name)
                time.sleep(0.5)
                alive = [os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z"
                         for p in pids]
        error = None
    except RuntimeError as exc:
        error = str(exc).splitlines()[0]
    # a worker stuck in its dataset: the loader's shutdown terminates it (the main process's SIGTERM)
    stuck = iter(DataLoader(Counting(20, stuck_after=2), batch_size=None, num_workers=2, worker_init_fn=init))
    next(stuck)
    t = time.monotonic()
    del stuck
    return {"batches": n, "got": got, "alive": alive, "error": error, "shutdown_s": time.monotonic() - t}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2] == "on")), flush=True)
