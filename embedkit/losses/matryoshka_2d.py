"""2D Matryoshka over (layer, dim) pairs around any loss: Starbucks (Zhuang et al. 2024, arXiv
2410.13230) and 2D Matryoshka Sentence Embeddings, 2DMSE (Li et al. 2024, arXiv 2402.14776).

The encoder gives every item one embedding per layer, e[:, l-1] = norm(pool(hidden state of layer
l)) for l = 1..L ([n, L, D]; ``Encoder.forward(layers=True)``, which the training module asks for
when the loss sets ``needs_layers``). A pair (l, d) is the model cut to its first l layers and the
embedding to its first d coordinates:

    x_(l,d) = norm(x[:, l-1, :d])          L = Σ_(l,d) w_(l,d) · L_inner(q_(l,d), p_(l,d), n_(l,d))

``mode=pairs`` (Starbucks' fine-tuning): the fixed list ``pairs`` (default: the dims D/8, D/4, D/2,
D on evenly spaced depths, ending at the full model (L, D)), weights ``weights`` (default 1).
``mode=sample`` (2DMSE): each step, the full model (L, D) plus ONE pair drawn uniformly from
``pairs`` (default: every (l, d) with l = 1..L and d in D/8..D, except (L, D)), both weight 1
(``weights`` does not apply). The draw is made once per loss call from a generator seeded by
(``seed``, the count of calls so far, a buffer saved with the checkpoint), so the cached step of
GradCache, every rank, and a resumed run see the same pair; the encoder never draws. 2DMSE's
alignment (KL) term between sub-models is not included.

With ``model.pooling=multi_vector`` each layer gives token sets ([n, L, T, d]); a pair cuts every
token vector to its first d coordinates and the inner loss scores by MaxSim.

The loss sees embeddings only, so it composes with every registered loss, with GradCache (which
caches the [n, L, D] tensor) and with cross-device negatives (``rows`` and ``mask`` pass through).
Parts: ``l<l>_d<d>`` per fixed pair; ``full`` and ``sampled`` in sample mode (the sampled pair as
``sampled_layer`` and ``sampled_dim``).

Config: ``loss=matryoshka_2d loss.pairs=[[2,16],[4,32]]`` or ``loss=matryoshka_2d loss.mode=sample``.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from embedkit.config.registry import register
from embedkit.losses.base import Loss, LossOutput
from embedkit.losses.matryoshka import check_weights, default_dims, inner_loss, sum_of_inner


def default_pairs(num_layers: int, embedding_dim: int) -> list[tuple[int, int]]:
    """Starbucks' diagonal: the dims D/8 .. D on depths spread evenly up to L (no repeats)."""
    dims = default_dims(embedding_dim)
    pairs = [(max(1, round(num_layers * (i + 1) / len(dims))), d) for i, d in enumerate(dims)]
    return list(dict.fromkeys(pairs))


def cut(x: torch.Tensor | None, layer: int, dim: int, axis: int = 1) -> torch.Tensor | None:
    """Per-layer embeddings (layers on ``axis``) -> the (layer, dim) sub-model's, the last axis cut to
    ``dim`` and re-normalised: [B, L, D] -> [B, dim]; token sets [B, L, T, d] -> [B, T, dim]."""
    return None if x is None else F.normalize(x.select(axis, layer - 1)[..., :dim], dim=-1)


@register("loss", "matryoshka_2d", nested={"inner": "loss"})
class Matryoshka2D(Loss):
    """Inputs q [B,L,D], p [B,L,D], n [B,K,L,D] | None (one embedding per layer). Output: Σ w · inner.

    ``pairs``: [[layer, dim], ...] with 1 <= layer <= L, 1 <= dim <= D. ``weights``: one per pair
    (``mode=pairs``). ``embedding_dim`` (D), ``num_layers`` (L) and ``seed`` come from the builder.
    """

    #: the training module asks the encoder for per-layer embeddings [n, L, D]
    needs_layers = True

    def __init__(
        self,
        inner: Loss | str = "infonce",
        mode: Literal["pairs", "sample"] = "pairs",
        pairs: Optional[list[list[int]]] = None,
        weights: Optional[list[float]] = None,
        *,
        embedding_dim: int,
        num_layers: int,
        seed: int,
    ):
        super().__init__()
        self.inner = inner_loss(inner)
        self.check_config({"mode": mode, "pairs": pairs, "weights": weights})
        self.mode = mode
        self.num_layers, self.embedding_dim, self.seed = int(num_layers), int(embedding_dim), int(seed)
        full = (self.num_layers, self.embedding_dim)
        if pairs is None:
            if mode == "pairs":
                pairs = default_pairs(self.num_layers, self.embedding_dim)
            else:
                pairs = [(l, d) for l in range(1, self.num_layers + 1) for d in default_dims(self.embedding_dim)]
                pairs = [pr for pr in pairs if pr != full] or [full]
        self.pairs = [(int(l), int(d)) for l, d in pairs]
        for l, d in self.pairs:
            if l > self.num_layers:
                raise ValueError(f"pairs: layer {l} is deeper than the backbone ({self.num_layers} layers)")
            if d > self.embedding_dim:
                raise ValueError(f"pairs: dim {d} is larger than the embedding ({self.embedding_dim} dimensions)")
        self.weights = [1.0] * len(self.pairs) if weights is None else [float(w) for w in weights]
        self.full = full
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))

    @staticmethod
    def check_config(params: dict) -> None:
        pairs, weights = params.get("pairs"), params.get("weights")
        if pairs is not None:
            if len(pairs) == 0:
                raise ValueError("pairs: must list at least one [layer, dim] pair")
            if any(len(pr) != 2 or int(pr[0]) < 1 or int(pr[1]) < 1 for pr in pairs):
                raise ValueError(f"pairs: each must be [layer >= 1, dim >= 1], got {list(pairs)}")
            if len({tuple(pr) for pr in pairs}) != len(pairs):
                raise ValueError(f"pairs: repeated pair in {list(pairs)}")
        if weights is not None and params.get("mode") == "sample":
            raise ValueError("weights: mode=sample weighs the full and the sampled model 1 each")
        check_weights(weights, pairs, "pairs", "pair")

    @staticmethod
    def trained_sizes(params: dict, num_layers: int, embedding_dim: int
                      ) -> tuple[list[int], list[tuple[int, int]] | None]:
        """(the dims of its pairs, largest first; the (layer, dim) pairs, sorted) a model trained with
        this loss's config ``params`` answers for. ``mode=sample`` trains every pair of its list, so
        its pairs are None (any); the full model (L, D) is always among them."""
        sample = params.get("mode") == "sample"
        pairs = params.get("pairs") or ([(1, d) for d in default_dims(embedding_dim)] if sample
                                        else default_pairs(num_layers, embedding_dim))
        pairs = {(int(l), int(d)) for l, d in pairs} | {(num_layers, embedding_dim)}
        return sorted({d for _, d in pairs}, reverse=True), (None if sample else sorted(pairs))

    def draw(self) -> tuple[int, int]:
        """The pair of this call (sample mode): seeded by (seed, calls so far); advances the count."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.draws))
        self.draws += 1
        return self.pairs[int(torch.randint(len(self.pairs), (1,), generator=gen))]

    def forward(self, q, p, n=None, rows=None, mask=None) -> LossOutput:
        if q.dim() < 3 or q.shape[1] != self.num_layers:
            raise ValueError(f"matryoshka_2d: expected per-layer embeddings [B, {self.num_layers}, ...], "
                             f"got {tuple(q.shape)}")
        if self.mode == "sample":
            sampled = self.draw()
            terms = [("full", self.full, 1.0), ("sampled", sampled, 1.0)]
        else:
            sampled = None
            terms = [(f"l{l}_d{d}", (l, d), w) for (l, d), w in zip(self.pairs, self.weights)]
        largest = max(terms, key=lambda term: term[1])[0]
        out = sum_of_inner(self.inner, [(name, (cut(q, l, d), cut(p, l, d), cut(n, l, d, axis=2)), w)
                                        for name, (l, d), w in terms], rows, mask, full=largest)
        if sampled is not None:
            out.parts["sampled_layer"] = torch.tensor(float(sampled[0]))
            out.parts["sampled_dim"] = torch.tensor(float(sampled[1]))
        return out
