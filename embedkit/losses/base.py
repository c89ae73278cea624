"""The loss contract.

``loss(q [B,D], p [B,D], n [B,K,D] | None) -> LossOutput(loss, parts)``. The candidates of query
q_i are every positive and every hard negative in the batch (gathered across ranks by
``embedkit.distributed``); the target is p_i. Losses see embeddings only and never call the model,
so wrappers (Matryoshka) compose with every loss and with GradCache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LossOutput:
    loss: torch.Tensor
    #: named components for logging (``train/loss/<name>``), detached
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss(nn.Module):
    def forward(self, q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None) -> LossOutput:
        raise NotImplementedError


def candidates(p: torch.Tensor, n: torch.Tensor | None) -> torch.Tensor:
    """All candidates of a batch, [B + B*K, D]: the positives, then each example's negatives in order."""
    if n is None or n.shape[1] == 0:
        return p
    return torch.cat([p, n.reshape(-1, n.shape[-1])], dim=0)


class Temperature(nn.Module):
    """τ, fixed or learnable; learnable τ is stored as log(1/τ) (CLIP's parametrisation)."""

    def __init__(self, value: float, learnable: bool):
        super().__init__()
        if value <= 0:
            raise ValueError("temperature must be positive")
        log_scale = torch.tensor(1.0 / value).log()
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self) -> torch.Tensor:
        # clamp: CLIP caps the logit scale at 100 to keep training stable
        return 1.0 / self.log_scale.clamp(max=torch.log(torch.tensor(100.0))).exp()
