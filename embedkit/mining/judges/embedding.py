"""The built-in judge: the mining model itself, score = the dot product of its embeddings (the cosine
when the model normalises, as embedkit models do by default)."""

from __future__ import annotations

import torch

from embedkit.config.registry import register
from embedkit.mining.judges.base import Judge, Pairs


@register("judge", "embedding")
class EmbeddingJudge(Judge):
    """Scores each pair by the mining model's similarity; no extra model, no image decoding."""

    def describe(self) -> dict:
        return {"name": "embedding"}

    def score(self, pairs: Pairs) -> torch.Tensor:
        return (pairs.query_embeddings.double() * pairs.candidate_embeddings.double()).sum(-1)
