"""Callbacks: plain progress lines when not on a terminal, and an atomically written last.ckpt."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from embedkit.files import temp_path


class LogProgress(L.Callback):
    """One line every ``every`` optimizer steps: step, loss, lr, speed, time left (CI-readable)."""

    def __init__(self, every: int, print_fn=print):
        self.every = max(1, every)
        self.print = print_fn
        self.start = None

    def on_train_start(self, trainer, pl_module):
        self.start = time.monotonic()

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, total = trainer.global_step, trainer.max_steps
        if step % self.every and step != total:
            return
        if getattr(self, "_last", None) == step:
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
        shown = {k: v for k, v in pl_module.val_results.items() if k.startswith("val/")}
        if shown:
            self.print(f"validation at step {trainer.global_step}: "
                       + "  ".join(f"{k} {v:.3f}" for k, v in shown.items()), flush=True)


class AtomicLastCheckpoint(L.Callback):
    """``<dir>/last.ckpt`` every ``every`` steps and at the end, written to a temporary name first."""

    def __init__(self, dirpath: str | Path, every: int | None):
        self.dirpath = Path(dirpath)
        self.every = every

    def save(self, trainer):
        path = self.dirpath / "last.ckpt"
        tmp = temp_path(path)
        # weights_only=False: a full, resumable checkpoint (optimizer, loops), said explicitly
        trainer.save_checkpoint(str(tmp), weights_only=False)  # every rank calls it (sharded strategies gather)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            os.replace(tmp, path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every and step and step % self.every == 0 and step != trainer.max_steps:
            self.save(trainer)

    def on_train_end(self, trainer, pl_module):
        self.save(trainer)
