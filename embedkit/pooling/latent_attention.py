"""Latent-attention pooling (NV-Embed, Lee et al. 2024, arXiv 2405.17428, §3.2).

The last layer's hidden states are the queries Q [T,H]; a trainable latent array is both keys and
values, K = V [r,H]. Multi-head cross-attention O = softmax(Q Kᵀ / √d) V, then an MLP (two linear
maps with a GELU between), then the mean over the sequence's real tokens. NV-Embed uses r = 512
latents and 8 heads.

Each token attends only to the latents, never to other tokens, so a row's output depends on its
own real tokens only: left and right padding give the same embedding.

``residual`` (default on, our choice, not in the paper's equations) adds each sublayer's input to
its output, a = x + attn(x), out = a + MLP(a): at initialisation the attention over r random
latents is near-uniform, so without it every sequence starts out with nearly the same embedding.
``residual=false`` is the paper's form, out = MLP(attn(x)).
"""

from __future__ import annotations

import torch

from embedkit.config.registry import register
from embedkit.pooling._attention import LatentAttentionHead
from embedkit.pooling.mean import masked_mean


@register("pooling", "latent_attention")
class LatentAttentionPooling(LatentAttentionHead):
    """Inputs: hidden [B,T,H], mask [B,T]. Output: [B,H].

    ``num_latents``: rows of the trainable latent array (r). ``num_heads``: attention heads (must
    divide the hidden size). ``mlp_ratio``: the MLP's inner width as a multiple of H.
    ``residual``: skip connections around attention and MLP.
    ``hidden_size`` is supplied by the builder.
    """

    def __init__(
        self,
        hidden_size: int,
        num_latents: int = 512,
        num_heads: int = 8,
        mlp_ratio: float = 1.0,
        residual: bool = True,
    ):
        super().__init__()
        self.residual = residual
        self.add_latent_attention(hidden_size, num_latents, num_heads, mlp_ratio)

    def forward(self, hidden, mask, all_layers=None) -> torch.Tensor:
        latents = self.latent_batch(hidden.shape[0], hidden.dtype)
        attended = self.cross_attend(hidden, latents)
        if not self.residual:
            return masked_mean(self.mlp(attended), mask)
        a = hidden + attended
        return masked_mean(a + self.mlp(a), mask)
