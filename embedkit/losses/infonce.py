"""InfoNCE (van den Oord et al. 2018, arXiv 1807.03748), as used by VLM2Vec (arXiv 2410.05160).

For query q_i the candidates are all positives and all hard negatives of the batch:
    L_q2c = -1/B Σ_i log( exp(s(q_i,p_i)/τ) / Σ_c exp(s(q_i,c)/τ) )
with s the dot product (embeddings are L2-normalised upstream, so cosine). Bidirectional adds the
candidate→query direction over the positives (for p_i the candidates are all queries, the target
q_i), L_c2q, and averages the two. τ is fixed or learnable (``learnable_temperature``).

Under cross-device negatives the loss gets the gathered batch and ``rows`` (this rank's examples):
only those rows are computed, their targets are global indices, the mean runs over those rows.

The computation is ``losses.base.contrastive_loss`` with α = 0; ``hardness_weighted`` is the same
core with α > 0.
"""

from __future__ import annotations

from typing import Literal

from embedkit.config.registry import register
from embedkit.losses.base import Loss, LossOutput, Temperature, check_temperature, contrastive_loss


@register("loss", "infonce")
class InfoNCE(Loss):
    """Inputs q [B,D], p [B,D], n [B,K,D] | None. Output: mean cross-entropy over candidates."""

    def __init__(self, temperature: float = 0.02, learnable_temperature: bool = False, bidirectional: bool = False,
                 maxsim: Literal["mean", "sum"] = "mean"):
        super().__init__()
        self.check_config({"temperature": temperature})
        self.temperature = Temperature(temperature, learnable_temperature)
        self.bidirectional = bidirectional
        self.maxsim = maxsim  # token sets only (multi_vector): MaxSim averaged or summed over the query's tokens

    @staticmethod
    def check_config(params: dict) -> None:
        check_temperature(params)

    def forward(self, q, p, n=None, rows=None, mask=None) -> LossOutput:
        return contrastive_loss(q, p, n, temperature=self.temperature(), rows=rows, bidirectional=self.bidirectional,
                                mask=mask, maxsim=self.maxsim)
