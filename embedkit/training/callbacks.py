"""The fit's callbacks: ``LogProgress`` (plain progress and validation lines when not on a terminal),
``AtomicLastCheckpoint`` (step checkpoints of a ``RunDir``, each written atomically, the newest also
as the run's last checkpoint), ``CleanStop`` (a signal ends the run after an optimizer step, with a
checkpoint)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from embedkit.distributed.ranks import all_max
from embedkit.errors import UserError
from embedkit.fault_points import fault_point
from embedkit.files import is_disk_full, link_atomic, move_into_place, temp_path
from embedkit.runs import RunDir


class LogProgress(L.Callback):
    """One line every ``every`` optimizer steps: step, loss, lr, speed, time left (CI-readable)."""

    def __init__(self, every: int, print_fn=print):
        self.every = max(1, every)
        self.print = print_fn
        self.start = None
        self._last: int | None = None  # the step last reported (a step's batches end more than once)

    def on_train_start(self, trainer, pl_module):
        self.start = time.monotonic()

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, total = trainer.global_step, trainer.max_steps
        if step % self.every and step != total:
            return
        if self._last == step:
            return
        self._last = step
        elapsed = time.monotonic() - self.start
        rate = step / elapsed if elapsed > 0 else 0.0
        left = (total - step) / rate if rate > 0 else float("nan")
        m = trainer.callback_metrics
        loss = float(m.get("train/loss", float("nan")))
        lr = float(m.get("train/lr", float("nan")))
        self.print(f"step {step}/{total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.1f} steps/s  ~{left:.0f}s left",
                   flush=True)

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return  # before/after figures are printed by `embedkit fit` itself
        # what this validation logged (the module's val/p@1, a validation callback's val/...)
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if shown:
            self.print(f"validation at step {trainer.global_step}: "
                       + "  ".join(f"{k} {v:.3f}" for k, v in shown.items()), flush=True)


class AtomicLastCheckpoint(L.Callback):
    """``run``'s step checkpoint every ``every`` optimizer steps and at the end (or at a clean stop),
    each written to a temporary name first; the run's last checkpoint is a hard link to the newest (a
    copy where links are refused); only the newest ``keep`` step files are kept.

    A checkpoint is never written with non-finite weights, and never while the module reports a
    diverged run (``pl_module.diverged_at``): the last good one stays the newest. A full disk stops the
    run with one line (``UserError``) naming the intact previous checkpoint; the temporaries are removed,
    as are stale ones a killed write left (at the start of training). It hosts the fit's fault points
    (``embedkit/fault_points.py``): ``checkpoint_write``, ``train_batch``, ``validation_batch``.
    """

    def __init__(self, run: RunDir, every: int | None, keep: int = 3):
        self.run = run
        self.every = every
        self.keep = max(1, keep)
        self.saved_step: int | None = None
        self.last_good: Path | None = None
        self._after_validation: int | None = None  # a step whose checkpoint waits for its validation

    def save(self, trainer, pl_module=None) -> Path | None:
        step = trainer.global_step
        if self.saved_step == step:
            return self.last_good
        module = pl_module or trainer.lightning_module
        if getattr(module, "diverged_at", None) is not None or not all_finite(module):
            return None
        path = self.run.step_checkpoint(step)
        failed = self._write(trainer, path) is not None
        if trainer.world_size > 1:  # one answer: every rank stops when the global zero's write failed
            failed = bool(all_max(int(failed), module.device))
        if failed:
            raise UserError(self._disk_full_line(path))
        self.saved_step, self.last_good = step, path
        return path

    def _write(self, trainer, path: Path) -> OSError | None:
        """Every rank calls it (sharded strategies gather); the global zero writes ``path`` under its
        temporary name, renames it, links the last checkpoint to it and prunes old step files. A full
        disk: the temporaries are removed (the previous checkpoints stand) and its error returned."""
        failure = None
        try:
            # weights_only=False: a full, resumable checkpoint (optimizer, loops), said explicitly
            trainer.save_checkpoint(str(temp_path(path)), weights_only=False)
            fault_point("checkpoint_write")
        except OSError as exc:
            failure = self._cleaned_up(exc, path)
        trainer.strategy.barrier()
        if trainer.is_global_zero and failure is None:
            try:
                link_atomic(move_into_place(path), self.run.last_checkpoint)
            except OSError as exc:
                failure = self._cleaned_up(exc, path)
            for old in self.run.step_checkpoints()[:-self.keep]:
                old.unlink(missing_ok=True)
        trainer.strategy.barrier()
        return failure

    def _cleaned_up(self, exc: OSError, path: Path) -> OSError:
        """A full disk's error, its temporaries removed; any other error raised as it is."""
        if not is_disk_full(exc):
            raise exc
        for tmp in (temp_path(path), temp_path(self.run.last_checkpoint)):
            tmp.unlink(missing_ok=True)
        return exc

    def _disk_full_line(self, path: Path) -> str:
        previous = [p for p in self.run.step_checkpoints() if p != path]
        kept = (f"the previous checkpoint {previous[-1]} is intact; free space and resume with: "
                f"embedkit fit resume={self.run.path}" if previous
                else "no checkpoint was written before it; free space and run again")
        return f"disk full writing {path}; {kept}"

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:  # a write killed between its temporary and the rename (the run dir is locked)
            for stale in self.run.checkpoints_dir.glob(f"{temp_path('*').name}"):
                stale.unlink(missing_ok=True)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        fault_point("validation_batch")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        fault_point("train_batch")
        step = trainer.global_step
        if (self.every and step and step % self.every == 0 and step != trainer.max_steps
                and pl_module.at_step_boundary()):
            if validation_follows(trainer):  # written once it has run: a kill inside it resumes before it
                self._after_validation = step
            else:
                self.save(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if self._after_validation == trainer.global_step and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._after_validation = None
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.save(trainer, pl_module)


def validation_follows(trainer) -> bool:
    """Whether Lightning validates after this training batch: every ``val_check_batch`` batches (``Fit``
    sets ``check_val_every_n_epoch=None``), Lightning's own test."""
    every = trainer.val_check_batch
    return (bool(trainer.enable_validation) and every not in (None, float("inf"))
            and (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % int(every) == 0)


def all_finite(module) -> bool:
    """Every parameter finite (local shards under FSDP2; one all-reduced answer when distributed)."""
    import torch

    ok = all(bool(torch.isfinite(getattr(p, "_local_tensor", p)).all()) for p in module.parameters())
    if module.trainer is not None and module.trainer.world_size > 1:
        ok = all_max(0 if ok else 1, module.device) == 0
    return ok


def exit_code_for(signum: int) -> int:
    """The exit status of a run stopped by a signal (the shell's 128 + signal number)."""
    return 128 + int(signum)


def signal_process_group(name: str) -> None:
    """Send signal ``name`` to this process's whole process group from a helper process (the sender
    is then neither this process nor any worker's parent, as with a scheduler's signal)."""
    import subprocess
    import sys

    code = f"import os, signal; os.killpg({os.getpgid(0)}, signal.{name})"
    subprocess.run([sys.executable, "-c", code], stderr=subprocess.DEVNULL, check=False)


class CleanStop(L.Callback):
    """SIGTERM, SIGINT (and ``extra`` signals, e.g. SIGUSR1 for SLURM's ``--signal``) finish the
    current optimizer step, write a checkpoint and stop the run; a second SIGINT aborts at once.

    The handlers are installed at ``on_train_start``, after Lightning's signal connector has put its
    own SIGTERM handler in (which would raise ``SIGTERMException`` out of the loop without a
    checkpoint), so these win. A handler only sets a flag; at each optimizer-step boundary the flag
    is all-reduced, so every rank stops after the same step (no rank waits in a collective).

    Test support: ``EMBEDKIT_TEST_SIGNAL_AFTER_BATCH=N`` makes global rank 0 send itself SIGTERM
    after its N-th training batch (micro-batch; inside an accumulation cycle when N is not a
    multiple of ``train.accumulate_steps``), so tests drive the real signal path deterministically.
    ``EMBEDKIT_TEST_SIGNAL_GROUP_AFTER_BATCH=N`` (or ``N:SIGINT``) signals the whole process group
    instead, DataLoader workers (and launched ranks) included, from a short-lived helper process, as
    ``kill -TERM -- -PGID``, ``timeout`` or SLURM do. ``EMBEDKIT_TEST_KILL_RANK_AFTER_BATCH=R:N``
    makes global rank R SIGKILL itself after its N-th batch (a rank that dies; ``R:N:SIGSTOP``: one
    that hangs).
    """

    def __init__(self, checkpoints: AtomicLastCheckpoint, extra: list[str] | None = None, print_fn=print):
        self.checkpoints = checkpoints
        self.extra = list(extra or [])
        self.print = print_fn
        self.received: int | None = None
        self.stopped_at: int | None = None
        self.signum: int | None = None
        self._previous: dict = {}
        self._batches = 0
        test_at = os.environ.get("EMBEDKIT_TEST_SIGNAL_AFTER_BATCH")
        self._test_at = int(test_at) if test_at else None
        at, _, name = os.environ.get("EMBEDKIT_TEST_SIGNAL_GROUP_AFTER_BATCH", "").partition(":")
        self._test_group = (int(at), name or "SIGTERM") if at else None
        rank, _, at = os.environ.get("EMBEDKIT_TEST_KILL_RANK_AFTER_BATCH", "").partition(":")
        at, _, self._test_kill_with = at.partition(":")
        self._test_kill = (int(rank), int(at)) if at else None

    def signals(self) -> list[int]:
        import signal

        return [signal.SIGTERM, signal.SIGINT] + [int(getattr(signal, name)) for name in self.extra]

    def _handle(self, signum, frame):
        import signal

        if self.received is not None and signum == signal.SIGINT:
            self.print("second interrupt: aborting now, without a checkpoint", flush=True)
            os._exit(exit_code_for(signum))
        if self.received is None:
            self.received = signum
            self.print(f"received {signal.Signals(signum).name}: stopping after this optimizer step "
                       "(interrupt again to abort at once)", flush=True)

    def on_train_start(self, trainer, pl_module):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals():
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batches += 1
        self._test_signals(trainer)
        if not pl_module.at_step_boundary():
            return  # finish the accumulation cycle: a stop lands on an optimizer step
        flag = self.received or 0
        if trainer.world_size > 1:  # every rank learns of a signal any rank received
            flag = all_max(flag, pl_module.device)
        if flag and self.stopped_at is None and getattr(pl_module, "diverged_at", None) is None:
            self.signum = self.received or int(flag)
            self.stopped_at = trainer.global_step
            self.checkpoints.save(trainer, pl_module)
            trainer.should_stop = True

    def _test_signals(self, trainer) -> None:
        """The test hooks (the class docstring): signals sent after this rank's N-th batch."""
        import signal

        if self._test_at is not None and self._batches == self._test_at and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGTERM)
        if self._test_group is not None and self._batches == self._test_group[0] and trainer.is_global_zero:
            signal_process_group(self._test_group[1])
        if self._test_kill == (trainer.global_rank, self._batches):
            import sys

            name = self._test_kill_with or "SIGKILL"
            print(f"test: rank {trainer.global_rank} sends itself {name}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), getattr(signal, name))

    def teardown(self, trainer, pl_module, stage):
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
