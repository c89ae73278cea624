"""Matryoshka representation learning (Kusupati et al. 2022, arXiv 2205.13147) around any loss.

    L = Σ_m c_m · L_inner( norm(q[:, :d_m]), norm(p[:, :d_m]), norm(n[..., :d_m]) )

Each nesting dimension d_m truncates the embeddings to their first d_m coordinates, re-normalises
them to unit length (so the inner loss still sees cosine similarities), and the weighted inner
losses are summed (MRL uses c_m = 1). The wrapper sees embeddings only, so it composes with every
registered loss and runs unchanged under GradCache and cross-device negatives (``rows`` and the
false-negative ``mask`` are passed through to the inner loss; ``masked_negatives`` is the inner
loss's count at the largest dim).

Config: ``loss=matryoshka loss.inner=hardness_weighted loss.dims=[64,128,256]``. Parts are logged
per dimension as ``dim_<d>``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from embedkit.config.registry import register
from embedkit.losses.base import Loss, LossOutput, call_loss


def check_weights(weights, entries, key: str, unit: str) -> None:
    """``weights``: None, or one non-negative weight per entry of ``entries`` (the ``key`` list)."""
    if weights is None:
        return
    if entries is None:
        raise ValueError(f"weights: set {key} too (one weight per {unit})")
    if len(weights) != len(entries):
        raise ValueError(f"weights: expected {len(entries)} weights (one per {unit}), got {len(weights)}")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights: must be >= 0, got {list(weights)}")


def inner_loss(inner: Loss | str) -> Loss:
    """The wrapped loss of a Matryoshka wrapper. From a config the registry builds the ``loss.inner``
    block itself (``nested=``) and passes the Loss; a registered name is accepted for a wrapper made
    in Python (``Matryoshka(embedding_dim=64)`` wraps ``infonce`` with its defaults)."""
    if not isinstance(inner, str):
        return inner
    from embedkit.config import registry

    return registry.build("loss", {"name": inner})


def sum_of_inner(inner: Loss, terms, rows, mask, full: str) -> LossOutput:
    """Σ weight · inner loss over ``terms`` = [(name, (q, p, n) cut to one sub-model, weight), ...]:
    parts ``<name>`` per term, and the inner loss's ``masked_negatives`` of the term named ``full``
    (the largest sub-model)."""
    total = terms[0][1][0].new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    for name, (q, p, n), weight in terms:
        out = call_loss(inner, q, p, n, rows=rows, mask=mask)
        total = total + weight * out.loss
        parts[name] = out.loss.detach()
        if "masked_negatives" in out.parts and name == full:
            parts["masked_negatives"] = out.parts["masked_negatives"]
    return LossOutput(total, parts)


def default_dims(embedding_dim: int) -> list[int]:
    """The full size and its halvings: D, D/2, D/4, D/8 (each at least 1, no repeats)."""
    return sorted({max(1, embedding_dim // f) for f in (8, 4, 2, 1)})


@register("loss", "matryoshka", nested={"inner": "loss"})
class Matryoshka(Loss):
    """Inputs q [B,D], p [B,D], n [B,K,D] | None. Output: Σ_m weight_m · inner loss at dims[m].

    ``dims``: the nesting dimensions (None: D, D/2, D/4, D/8 of the embedding size D); each must be
    at most D. ``weights``: one per dim (None: all 1). ``embedding_dim`` (D) is supplied by the
    builder (``registry.build("loss", block, embedding_dim=D)``), not the config.
    """

    def __init__(
        self,
        inner: Loss | str = "infonce",
        dims: Optional[list[int]] = None,
        weights: Optional[list[float]] = None,
        *,
        embedding_dim: int,
    ):
        super().__init__()
        self.inner = inner_loss(inner)
        self.check_config({"dims": dims, "weights": weights})
        if dims is None:
            dims = default_dims(embedding_dim)
        if max(dims) > embedding_dim:
            raise ValueError(f"dims: {max(dims)} is larger than the embedding ({embedding_dim} dimensions)")
        self.dims = [int(d) for d in dims]
        self.weights = [1.0] * len(self.dims) if weights is None else [float(w) for w in weights]
        self.embedding_dim = embedding_dim

    @staticmethod
    def check_config(params: dict) -> None:
        dims, weights = params.get("dims"), params.get("weights")
        if dims is not None:
            if len(dims) == 0:
                raise ValueError("dims: must list at least one dimension")
            if any(int(d) < 1 for d in dims):
                raise ValueError(f"dims: every dimension must be >= 1, got {list(dims)}")
            if len(set(dims)) != len(dims):
                raise ValueError(f"dims: repeated dimension in {list(dims)}")
        check_weights(weights, dims, "dims", "dim")

    @staticmethod
    def trained_sizes(params: dict, num_layers: int, embedding_dim: int) -> tuple[list[int], None]:
        """(the nesting dims, largest first; no layer pairs) a model trained with this loss's config
        ``params`` answers for: ``dims``, or the default halvings of D."""
        dims = params.get("dims") or default_dims(embedding_dim)
        return sorted({int(d) for d in dims}, reverse=True), None

    def forward(self, q, p, n=None, rows=None, mask=None) -> LossOutput:
        terms = [(f"dim_{d}", [F.normalize(x[..., :d], dim=-1) if x is not None else None for x in (q, p, n)], w)
                 for d, w in zip(self.dims, self.weights)]
        return sum_of_inner(self.inner, terms, rows, mask, full=f"dim_{max(self.dims)}")
