"""The block shared by the attention pooling heads: a trainable latent array, multi-head
cross-attention (``nn.MultiheadAttention``) and an MLP (two linear maps with a GELU between).

``latent_attention`` (NV-Embed, arXiv 2405.17428) lets the tokens attend to the latents;
``multi_layer`` (arXiv 2409.02727) lets the latents attend to per-layer summaries. Both are
subclasses of ``LatentAttentionHead`` and call ``add_latent_attention`` in their constructor; what
attends to what, and how the MLP and the mean follow, stays in each head.

The block's parameters are attributes of the head itself (``latents``, ``attention.*``, ``mlp.*``),
not of a submodule, so the heads' state_dict keys are those of their first versions and old
checkpoints load. ``add_latent_attention`` creates them in a fixed order (latents, attention, MLP):
a head seeded the same way gets the same initial weights, and a head that registers its own
parameters first (``multi_layer``'s ``layer_embedding``) keeps its parameter order, on which
saved optimizer state depends.
"""

from __future__ import annotations

import torch
from torch import nn

from embedkit.pooling.base import Pooling


class LatentAttentionHead(Pooling):
    """Base of the heads built on a latent array + cross-attention + MLP (not registered itself)."""

    @staticmethod
    def check_config(params: dict) -> None:
        for key in ("num_latents", "num_heads"):
            if params[key] < 1:
                raise ValueError(f"{key}: must be >= 1, got {params[key]}")
        if params["mlp_ratio"] <= 0:
            raise ValueError(f"mlp_ratio: must be positive, got {params['mlp_ratio']}")

    def add_latent_attention(self, hidden_size: int, num_latents: int, num_heads: int, mlp_ratio: float) -> None:
        """Create ``latents`` [r,H], ``attention`` (``num_heads`` heads) and ``mlp`` (inner width
        ``mlp_ratio``·H), in that order; ``ValueError("<param>: <why>")`` on bad values."""
        self.check_config({"num_latents": num_latents, "num_heads": num_heads, "mlp_ratio": mlp_ratio})
        if hidden_size % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide the hidden size {hidden_size}")
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size) * hidden_size**-0.5)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        inner = max(1, int(round(hidden_size * mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(hidden_size, inner), nn.GELU(), nn.Linear(inner, hidden_size))

    def latent_batch(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """The latent array repeated for each row of a batch: [batch, r, H] (a view, no copy)."""
        return self.latents.to(dtype).unsqueeze(0).expand(batch, -1, -1)

    def cross_attend(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of ``queries`` [B,Q,H] over ``keys`` [B,K,H] (also the values): [B,Q,H]."""
        attended, _ = self.attention(queries, keys, keys, need_weights=False)
        return attended
