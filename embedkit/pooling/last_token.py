"""Last-token pooling: the hidden state of each sequence's last real token (VLM2Vec, E5-Mistral)."""

from __future__ import annotations

import torch

from embedkit.config.registry import register
from embedkit.pooling.base import Pooling, last_token_states


@register("pooling", "last_token")
class LastTokenPooling(Pooling):
    """Inputs: hidden [B,T,H], mask [B,T]. Output: [B,H], the state at each row's last real token."""

    def forward(self, hidden, mask, all_layers=None) -> torch.Tensor:
        return last_token_states(hidden, mask)
