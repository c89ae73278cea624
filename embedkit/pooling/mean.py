"""Mean pooling: the average of the hidden states of each sequence's real tokens (masked mean)."""

from __future__ import annotations

from typing import Literal

import torch

from embedkit.config.registry import register
from embedkit.pooling.base import Pooling


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` [B,T,H] over the positions where ``mask`` [B,T] is set: [B,H].

    Padding is zeroed with ``where`` (not multiplied away), so whatever the padded positions hold,
    even inf or NaN, cannot reach the result: left and right padding give the same answer.
    """
    keep = mask.bool().unsqueeze(-1)
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
    count = keep.sum(dim=1).clamp(min=1).to(x.dtype)
    return total / count


@register("pooling", "mean")
class MeanPooling(Pooling):
    """Inputs: hidden [B,T,H], mask [B,T]. Output: [B,H], the mean over each row's real tokens.

    ``span: vision`` (jina-embeddings-v4's single vector, HF jinaai/jina-embeddings-v4
    ``get_single_vector_embeddings``): a row with vision blocks is averaged over them only, from
    ``<|vision_start|>`` to ``<|vision_end|>`` inclusive (``span`` [B,T], ``BackboneOutput.span``: the backbone
    marks them); a row without, over its real tokens. jina picks one rule per batch from its first row (its
    batches hold one modality); this rule is per row, so an embedding never depends on its batch."""

    def __init__(self, span: Literal["all", "vision"] = "all"):
        super().__init__()
        self.needs_span = span == "vision"

    def forward(self, hidden, mask, all_layers=None, span=None) -> torch.Tensor:
        if not self.needs_span:
            return masked_mean(hidden, mask)
        if span is None:
            raise ValueError("mean pooling with span=vision got no vision span from the backbone")
        span = span.bool() & mask.bool()
        # per row: the vision span where the row has one, else every real token
        return masked_mean(hidden, torch.where(span.any(dim=1, keepdim=True), span, mask.bool()))
