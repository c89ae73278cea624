"""``trained_sizes(loss, L, D)``: the embedding sizes a model trained with a loss answers for.

A loss that trains nested sub-models (``matryoshka``: dims; ``matryoshka_2d``: (layer, dim) pairs)
declares ``trained_sizes(params, num_layers, embedding_dim) -> (dims | None, pairs | None)`` on its
class; other losses train the full model only: (None, None). Whoever knows a model's training
config (the model resolver, ``embedkit/export/reader.py``) asks here, so the encoder holds the
answer in its ``Provenance`` without knowing any loss by name.
"""

from __future__ import annotations


def trained_sizes(loss: dict | None, num_layers: int, embedding_dim: int
                  ) -> tuple[list[int] | None, list[tuple[int, int]] | None]:
    """``loss``: the training config's ``loss`` block. (Matryoshka dims, 2D pairs), or (None, None)."""
    from embedkit.config import registry
    from embedkit.errors import ConfigError

    if not loss or not loss.get("name"):
        return None, None
    try:
        factory = registry.get("loss", loss["name"]).factory
    except ConfigError:  # a plugin loss no longer importable: nothing is known about nesting
        return None, None
    declared = getattr(factory, "trained_sizes", None)
    if declared is None:
        return None, None
    return declared({k: v for k, v in loss.items() if k != "name"}, num_layers, embedding_dim)
