"""The training data's skipped samples, by reason, as the module sees them.

Every ``TrainBatch`` carries the samples its DataLoader worker skipped since that worker's previous batch
(``TrainBatch.skipped``: ``data/stream.py``), so the sum over the batches a rank trained on is exactly that
rank's skips before them; nothing is lost to prefetching (a batch not trained on is not counted) and
nothing is counted twice. The per-rank counts live on the host; they are summed over the ranks (one
all-reduce of a small vector) only when they are reported: at the trainer's logging interval, at a
checkpoint and at the end of fit. Reported as the metrics ``data/skipped/<reason>`` (every reason of
``shards.SKIP_REASONS``, so every rank logs the same keys) and as one log line whenever the total rose
since the last report, and one at the end of fit.
"""

from __future__ import annotations

import logging

import torch

from embedkit.data.shards import SKIP_REASONS
from embedkit.distributed.ranks import process_group_up, rank_and_world, sum_over_ranks

log = logging.getLogger(__name__)


class SkipCounts:
    """This rank's skipped samples by reason, plus the all-ranks total restored from a checkpoint."""

    def __init__(self):
        self.local = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)  # this rank's, since the run (re)started
        self.restored = torch.zeros(len(SKIP_REASONS), dtype=torch.int64)  # all ranks', before a resume
        self.reported = 0  # the all-ranks total of the last log line

    def add(self, skipped: dict[str, int]) -> None:
        for reason, n in skipped.items():
            self.local[SKIP_REASONS.index(reason)] += int(n)

    def totals(self, device) -> dict[str, int]:
        """All ranks' skips by reason (a collective when distributed: every rank must call it together)."""
        t = self.local
        if process_group_up():  # on the rank's device (NCCL); the one read-back of the report
            t = sum_over_ranks(t.to(device, copy=True)).cpu()
        t = t + self.restored
        return dict(zip(SKIP_REASONS, (int(x) for x in t)))

    def report(self, totals: dict[str, int], final: bool = False) -> None:
        """The log line (rank 0): at the end of fit, or when the total rose since the last report."""
        total = sum(totals.values())
        if rank_and_world()[0] != 0 or (not final and total <= self.reported):
            return
        self.reported = total
        parts = ", ".join(f"{r} {n}" for r, n in totals.items() if n)
        log.warning("data: %d training sample%s skipped %s%s", total, "" if total == 1 else "s",
                    "in all" if final else "so far", f" ({parts})" if parts else "")

    def state(self, device) -> dict[str, int]:
        return self.totals(device)

    def load(self, saved: dict[str, int] | None) -> None:
        """Continue from a checkpoint's totals (kept on rank 0 only, so the sum over ranks stays true)."""
        if saved and rank_and_world()[0] == 0:
            self.restored = torch.tensor([int(saved.get(r, 0)) for r in SKIP_REASONS], dtype=torch.int64)
            self.reported = sum(saved.values())
