"""Mean pooling: the average of the hidden states of each sequence's real tokens (masked mean)."""

from __future__ import annotations

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
    """Inputs: hidden [B,T,H], mask [B,T]. Output: [B,H], the mean over each row's real tokens."""

    def forward(self, hidden, mask, all_layers=None) -> torch.Tensor:
        return masked_mean(hidden, mask)
