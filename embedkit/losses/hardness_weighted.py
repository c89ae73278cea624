"""Hardness-weighted contrastive loss (LLaVE, Lan et al. 2025, arXiv 2503.04812, §3).

LLaVE reweights each negative pair by how hard it is. For query q_i with positive t_i and the other
candidates t_j (every other positive and every hard negative of the gathered batch):

    L_i = -log( exp(s_ii/τ) / ( exp(s_ii/τ) + Σ_{j≠i} w_ij · exp(s_ij/τ) ) ),   w_ij = exp(α · s_ij)

with s the cosine similarity (embeddings are L2-normalised upstream) and the weight w_ij treated
as a constant (no gradient flows through it). Positives weigh 1. So this is cross-entropy over the
logits s/τ with α·stopgrad(s) added to every negative logit. α = 0 gives InfoNCE.

``bidirectional`` (default on) adds the target→query direction over the positives (for p_i the
candidates are the queries q_j, weighted the same way) and averages the two directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from embedkit.config.registry import register
from embedkit.losses.base import Loss, LossOutput, Temperature, candidates, row_slice


def weighted_ce(sim: torch.Tensor, targets: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mean over rows of -log softmax at ``targets`` of sim/τ + α·sg(sim) on the non-target entries."""
    boost = alpha * sim.detach()
    boost = boost.scatter(1, targets[:, None], 0.0)  # the positive keeps weight 1
    return F.cross_entropy(sim / tau + boost, targets)


@register("loss", "hardness_weighted")
class HardnessWeighted(Loss):
    """Inputs q [B,D], p [B,D], n [B,K,D] | None. Output: hardness-weighted cross-entropy.

    ``alpha`` (α ≥ 0) sets how strongly hard negatives are up-weighted; LLaVE trains with α = 9 and
    τ = 0.02 (check these against your setting: they are the paper's defaults, not tuned here).
    """

    def __init__(
        self,
        alpha: float = 9.0,
        temperature: float = 0.02,
        learnable_temperature: bool = False,
        bidirectional: bool = True,
    ):
        super().__init__()
        if alpha < 0:
            raise ValueError("alpha must be >= 0")
        self.alpha = float(alpha)
        self.temperature = Temperature(temperature, learnable_temperature)
        self.bidirectional = bidirectional

    @staticmethod
    def check_config(params: dict) -> None:
        if params["alpha"] < 0:
            raise ValueError(f"alpha: must be >= 0, got {params['alpha']}")
        if params["temperature"] <= 0:
            raise ValueError(f"temperature: must be positive, got {params['temperature']}")

    def forward(self, q, p, n=None, rows=None) -> LossOutput:
        tau = self.temperature()
        own = row_slice(rows, q.shape[0])
        targets = torch.arange(own.start, own.stop, device=q.device)
        q2c = weighted_ce(q[own] @ candidates(p, n).T, targets, tau, self.alpha)
        parts = {"q2c": q2c.detach(), "temperature": tau.detach()}
        if not self.bidirectional:
            return LossOutput(q2c, parts)
        c2q = weighted_ce(p[own] @ q.T, targets, tau, self.alpha)
        parts["c2q"] = c2q.detach()
        return LossOutput((q2c + c2q) / 2, parts)
