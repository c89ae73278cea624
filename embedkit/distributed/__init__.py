"""Cross-device negatives: gather embeddings across ranks with gradients; one loss entry point."""

from embedkit.distributed.loss import distributed_loss

__all__ = ["distributed_loss"]
