"""Validation on MMEB eval subsets during fit, as a Lightning callback the fit command installs.

At every validation, ``val/<dataset>/p@1`` on the first ``max_rows`` rows of each dataset and
their mean as ``val/mmeb/p@1`` (the held-out set of the training data owns ``val/p@1``). Under DDP
every rank encodes a share (``mmeb.evaluate``) and every rank gets the same numbers.
"""

from __future__ import annotations

from typing import Sequence

import lightning as L

from embedkit.eval.mmeb import validation_metrics


class MMEBValidation(L.Callback):
    """``chunk_size``: items per forward pass of the encoder (``train.chunk_size``)."""

    def __init__(self, root: str, datasets: Sequence[str] = (), max_rows: int = 100, chunk_size: int = 16):
        self.root = root
        self.datasets = list(datasets)
        self.max_rows = max_rows
        self.chunk_size = chunk_size

    def on_validation_epoch_end(self, trainer, pl_module):
        encoder = pl_module.encoder
        metrics = validation_metrics(lambda items: encoder.encode_items(items, self.chunk_size), self.root,
                                     self.datasets, max_rows=self.max_rows, prefix="val")
        metrics["val/mmeb/p@1"] = metrics.pop("val/p@1")
        for name, value in metrics.items():  # logged: trainer.validate returns them beside val/p@1
            pl_module.log(name, value)
