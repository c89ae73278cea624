"""Multi-vector pooling for late interaction (ColBERT, Khattab & Zaharia 2020, arXiv 2004.12832;
ColPali, Faysse et al. 2024, arXiv 2407.01449).

Instead of one vector per item, every real token keeps a vector: a linear projection of its last-layer
hidden state to a small dimension ``dim`` (ColBERT and ColPali use 128), L2-normalised per token.
Scoring is MaxSim (``losses.similarity.maxsim_similarity``): each query token takes its best match among
the candidate's tokens, and the matches are summed.

Output: a token-vector set [B, max_tokens, dim]. The real tokens come first in their order; when a
sequence has more than ``max_tokens`` real tokens, its LAST ``max_tokens`` are kept (in a causal
decoder they have seen the whole input): the token pruning. The remaining slots are zero vectors. A fixed length makes every chunk's and every rank's embeddings one shape, so they
concatenate under GradCache and all-gather across ranks unchanged, and a zero vector marks padding
(``losses.similarity.token_mask``): no separate mask travels. Padding (left or right) never reaches a kept
token, so an embedding does not depend on what else is in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from embedkit.config.registry import register
from embedkit.pooling.base import Pooling


@register("pooling", "multi_vector")
class MultiVectorPooling(Pooling):
    """Inputs: hidden [B,T,H], mask [B,T]. Output: [B, max_tokens, dim], unit token vectors, zero padding.

    ``dim``: the per-token projection size. ``max_tokens``: token vectors kept per item (the last
    ones). ``hidden_size`` is supplied by the builder.
    """

    def __init__(self, hidden_size: int, dim: int = 128, max_tokens: int = 64):
        super().__init__()
        self.check_config({"dim": dim, "max_tokens": max_tokens})
        self.output_dim = int(dim)
        self.max_tokens = int(max_tokens)
        self.proj = nn.Linear(hidden_size, self.output_dim)

    @staticmethod
    def check_config(params: dict) -> None:
        for key in ("dim", "max_tokens"):
            if params[key] < 1:
                raise ValueError(f"{key}: must be >= 1, got {params[key]}")

    def forward(self, hidden, mask, all_layers=None) -> torch.Tensor:
        real = mask.bool()
        B, T = real.shape
        M = self.max_tokens
        # rank of each real token counted from the sequence's end (0 = last real token)
        from_end = real.flip(1).long().cumsum(1).flip(1) - 1
        keep = real & (from_end < M)
        # kept tokens first, in order: sort positions, the dropped ones pushed behind
        positions = torch.arange(T, device=hidden.device).expand(B, T)
        order = torch.where(keep, positions, positions + T).argsort(dim=1)
        if T < M:
            order = torch.cat([order, order.new_zeros(B, M - T)], dim=1)
        order = order[:, :M]
        slot_real = torch.arange(M, device=hidden.device)[None, :] < keep.sum(dim=1, keepdim=True)
        tokens = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
        vectors = F.normalize(self.proj(tokens.to(self.proj.weight.dtype)).float(), dim=-1)
        return torch.where(slot_real[..., None], vectors, torch.zeros((), dtype=vectors.dtype, device=vectors.device))
