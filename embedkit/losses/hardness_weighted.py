"""Hardness-weighted contrastive loss (LLaVE, Lan et al. 2025, arXiv 2503.04812, §3).

LLaVE reweights each negative pair by how hard it is. For query q_i with positive t_i and the other
candidates t_j (every other positive and every hard negative of the gathered batch):

    L_i = -log( exp(s_ii/τ) / ( exp(s_ii/τ) + Σ_{j≠i} w_ij · exp(s_ij/τ) ) ),   w_ij = exp(α · s_ij)

with s the cosine similarity (embeddings are L2-normalised upstream) and the weight w_ij treated
as a constant (no gradient flows through it). Positives weigh 1. So this is cross-entropy over the
logits s/τ with α·stopgrad(s) added to every negative logit. α = 0 gives InfoNCE: both are
``losses.base.contrastive_loss``.

``bidirectional`` (default on) adds the target→query direction over the positives (for p_i the
candidates are the queries q_j, weighted the same way) and averages the two directions.
"""

from __future__ import annotations

from typing import Literal

from embedkit.config.registry import register
from embedkit.losses.base import Loss, LossOutput, Temperature, check_temperature, contrastive_loss


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
        maxsim: Literal["mean", "sum"] = "mean",
    ):
        super().__init__()
        self.check_config({"alpha": alpha, "temperature": temperature})
        self.alpha = float(alpha)
        self.temperature = Temperature(temperature, learnable_temperature)
        self.bidirectional = bidirectional
        self.maxsim = maxsim  # token sets only (multi_vector): MaxSim averaged or summed over the query's tokens

    @staticmethod
    def check_config(params: dict) -> None:
        if params["alpha"] < 0:
            raise ValueError(f"alpha: must be >= 0, got {params['alpha']}")
        check_temperature(params)

    def forward(self, q, p, n=None, rows=None, mask=None) -> LossOutput:
        return contrastive_loss(
            q, p, n, temperature=self.temperature(), rows=rows, alpha=self.alpha, bidirectional=self.bidirectional,
            mask=mask, maxsim=self.maxsim,
        )
