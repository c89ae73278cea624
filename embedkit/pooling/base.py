"""The pooling-head contract.

``head(hidden [B,T,H], mask [B,T], all_layers) -> [B, D]``, correct for left AND right padding: an
embedding must not depend on what else is in the batch. ``all_layers`` is the tuple of every layer's
hidden states when ``needs_all_layers`` is set, else None. Heads with parameters are ordinary
submodules of the LightningModule, so checkpoints carry them.
"""

from __future__ import annotations

import torch
from torch import nn


class Pooling(nn.Module):
    #: ask the backbone for every layer's hidden states (multi-layer heads)
    needs_all_layers: bool = False
    #: take the backbone's vision span (``forward(..., span=[B,T])``; ``mean`` with ``span: vision``)
    needs_span: bool = False

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor, all_layers: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor:
        raise NotImplementedError


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left, right or no padding: [B]."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(dim=1)


def last_token_states(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The state at each row's last real token: hidden [B,T,H], mask [B,T] -> [B,H]."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(mask)]
