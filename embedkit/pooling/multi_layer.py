"""Multi-layer trainable pooling (Tang & Yang 2024, "Pooling and Attention: What Are Effective
Designs for LLM-Based Embedding Models?", arXiv 2409.02727).

Instead of the last layer only, every layer contributes: each layer's sequence summary (its
last-token state, or its masked mean with ``token=mean``) plus a trainable per-layer embedding forms
a sequence of L vectors; a trainable latent array cross-attends to them (latents are the queries,
the layer vectors keys and values), an MLP follows, and the latents' outputs are averaged into the
embedding. The layer embedding lets the head learn which layers to trust.

Only each row's real tokens enter a layer summary, so left and right padding give the same result.
``all_layers`` is the backbone's tuple of hidden states: the embedding output plus each of the
``num_layers`` layers (Hugging Face's ``output_hidden_states``), or the layers alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from embedkit.config.registry import register
from embedkit.pooling._attention import LatentAttentionHead
from embedkit.pooling.base import last_token_states
from embedkit.pooling.mean import masked_mean


@register("pooling", "multi_layer")
class MultiLayerPooling(LatentAttentionHead):
    """Inputs: hidden [B,T,H], mask [B,T], all_layers (L or L+1 tensors [B,T,H]). Output: [B,H].

    ``token``: the per-layer summary (``last``: last real token, ``mean``: masked mean).
    ``num_latents``: trainable queries. ``num_heads`` must divide the hidden size.
    ``hidden_size`` and ``num_layers`` are supplied by the builder.
    """

    needs_all_layers = True

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        token: Literal["last", "mean"] = "last",
        num_latents: int = 1,
        num_heads: int = 8,
        mlp_ratio: float = 1.0,
    ):
        super().__init__()
        self.token = token
        self.num_layers = num_layers
        self.layer_embedding = nn.Parameter(torch.zeros(num_layers + 1, hidden_size))  # first: parameter order
        self.add_latent_attention(hidden_size, num_latents, num_heads, mlp_ratio)

    def summarise(self, layer: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.token == "mean":
            return masked_mean(layer, mask)
        return last_token_states(layer, mask)

    def forward(self, hidden, mask, all_layers=None) -> torch.Tensor:
        if all_layers is None:
            raise ValueError("multi_layer pooling needs all_layers (the backbone's hidden states of every layer)")
        n = len(all_layers)
        if n not in (self.num_layers, self.num_layers + 1):
            raise ValueError(f"multi_layer pooling: expected {self.num_layers} or {self.num_layers + 1} layers, got {n}")
        layers = torch.stack([self.summarise(h, mask) for h in all_layers], dim=1)  # [B, n, H]
        layers = layers + self.layer_embedding[-n:].to(layers.dtype)
        attended = self.cross_attend(self.latent_batch(layers.shape[0], layers.dtype), layers)
        return self.mlp(attended).mean(dim=1)
