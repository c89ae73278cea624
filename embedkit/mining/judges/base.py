"""The judge contract: ``judge.score(pairs: Pairs) -> Tensor [N]``, higher = more relevant.

``Pairs`` holds N aligned (query, candidate) pairs of one mining block: the mining model's
embeddings of both sides (always there, free) and the raw ``Item``s (decoded on first use, so a judge
that only needs embeddings never decodes an image). Mining asks the judge for each query's windowed
candidates and for the query's own positive in the same call, and drops a candidate scoring above
``threshold * score(query, positive)`` (NV-Retriever's TopK-PercPos, Moreira et al. 2024, arXiv
2407.15831; for a negative positive score the same margin below it: ``miner.false_negative_bar``). A judge must be deterministic (re-mining is byte-identical) and return float scores on
the scale the threshold is meant for (a probability, a cosine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from embedkit.data.schema import Item


@dataclass
class Pairs:
    """N aligned (query, candidate) pairs."""

    query_embeddings: torch.Tensor  # [N, D], the mining model's, L2-normalised when it normalises
    candidate_embeddings: torch.Tensor  # [N, D]
    _queries: Callable[[], list[Item]]
    _candidates: Callable[[], list[Item]]

    def __len__(self) -> int:
        return self.query_embeddings.shape[0]

    def queries(self) -> list[Item]:
        return self._queries()

    def candidates(self) -> list[Item]:
        return self._candidates()


class Judge:
    """Scores (query, candidate) pairs; subclass and register with ``@register("judge", name)``."""

    #: recorded in the mining manifest (provenance); a judge with weights should name them here
    def describe(self) -> dict:
        return {"name": type(self).__name__}

    def score(self, pairs: Pairs) -> torch.Tensor:
        raise NotImplementedError
