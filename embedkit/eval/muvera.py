"""MUVERA: multi-vector retrieval through fixed-dimensional encodings: exact MaxSim of token-vector
sets approximated by single-vector inner products, for ``data.eval.retrieval=muvera``.

Dhulipala, Hadian, Jayaram, Lee, Mirrokni, "MUVERA: Multi-Vector Retrieval via Fixed Dimensional
Encodings", arXiv 2405.19588, Sec. 2. A query or document is a set of token vectors; late interaction
scores a pair by MaxSim (Chamfer similarity), ``sum_{q in Q} max_{p in P} <q, p>``. MUVERA maps each
set to one vector, its fixed-dimensional encoding (FDE), whose inner product approximates MaxSim, so
single-vector search finds candidates that exact MaxSim then re-ranks. Per repetition ``r = 1..R``:

- SimHash partition: ``k_sim`` Gaussian vectors ``g_1..g_k``; token ``x`` falls in bucket
  ``phi(x) = sum_i [<g_i, x> > 0] 2^(i-1)``, one of ``B = 2^k_sim``.
- Inner projection ``psi(x) = S x / sqrt(d_proj)`` with ``S`` a ``d_proj x d`` matrix of random +-1
  (an AMS sketch); ``d_proj=None`` keeps ``psi(x) = x``.
- Query block ``b``: the SUM of ``psi(q)`` over the query tokens in bucket ``b``.
- Document block ``b``: the AVERAGE of ``psi(p)`` over the document tokens in bucket ``b``; an empty
  bucket (``fill_empty``) takes ``psi(p)`` of the token whose SimHash code is nearest to ``b`` in
  Hamming distance (ties: the earliest token).
- The FDE concatenates the ``B`` blocks of every repetition (``R * B * d_proj`` numbers); an optional
  final projection (``final_dim``) multiplies it by a ``final_dim x (R B d_proj)`` random +-1 matrix over
  ``sqrt(final_dim)``. Queries and documents share every random draw (``seed``).

Retrieval (``MuveraIndex.search``): the ``candidates`` best documents by FDE inner product, re-ranked
by exact MaxSim; the top ``k`` are returned.

This module works on token-vector sets given as padded tensors with masks. In ``embedkit eval``
(``data.eval.retrieval=muvera``, ``muvera_row_scores``) the sets come from ``model.pooling=multi_vector``
(zero vectors pad them; ``losses.similarity.token_mask`` gives the mask): each MMEB query's own candidate list
is ranked by FDE inner product and its best ``candidates`` are re-ranked by exact MaxSim.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from embedkit.errors import UserError
from embedkit.eval.retrieval import row_block, scores_by_row
from embedkit.losses.similarity import maxsim_similarity, token_mask


@dataclass
class FDEConfig:
    k_sim: int = 4
    d_proj: int | None = 16
    repetitions: int = 16
    fill_empty: bool = True
    final_dim: int | None = None
    seed: int = 0


class FDE:
    """The random draws of one FDE configuration for token vectors of size ``dim``."""

    def __init__(self, dim: int, config: FDEConfig | None = None):
        c = self.config = config or FDEConfig()
        if c.k_sim < 0 or c.repetitions < 1 or (c.d_proj is not None and c.d_proj < 1):
            raise ValueError(f"FDE: need k_sim >= 0, repetitions >= 1, d_proj >= 1 or None; got {c}")
        g = torch.Generator().manual_seed(c.seed)
        self.dim = dim
        self.buckets = 2**c.k_sim
        self.planes = torch.randn(c.repetitions, c.k_sim, dim, generator=g)  # [R, k, d]
        self.d_proj = c.d_proj or dim
        self.proj = None
        if c.d_proj is not None:
            signs = torch.randint(0, 2, (c.repetitions, c.d_proj, dim), generator=g).float() * 2 - 1
            self.proj = signs / math.sqrt(c.d_proj)  # [R, d_proj, d]
        self.width = c.repetitions * self.buckets * self.d_proj
        self.final = None
        if c.final_dim is not None:
            signs = torch.randint(0, 2, (c.final_dim, self.width), generator=g).float() * 2 - 1
            self.final = signs / math.sqrt(c.final_dim)
            self.width = c.final_dim

    def bucket(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, T, d] -> [R, N, T]`` SimHash bucket of every token in every repetition."""
        bits = (torch.einsum("ntd,rkd->rntk", x.float(), self.planes) > 0).long()
        return (bits * (2 ** torch.arange(self.config.k_sim))).sum(-1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, T, d] -> [R, N, T, d_proj]``: ``psi`` of every token in every repetition."""
        if self.proj is None:
            return x.float().unsqueeze(0).expand(self.config.repetitions, *x.shape)
        return torch.einsum("ntd,rpd->rntp", x.float(), self.proj)

    def _blocks(self, x: torch.Tensor, mask: torch.Tensor | None):
        n, t, _ = x.shape
        mask = torch.ones(n, t, dtype=torch.bool) if mask is None else mask.bool()
        codes, psi = self.bucket(x), self.project(x) * mask[None, :, :, None]
        sums = torch.zeros(self.config.repetitions, n, self.buckets, self.d_proj)
        index = codes.unsqueeze(-1).expand_as(psi)
        sums.scatter_add_(2, index, psi)
        counts = torch.zeros(self.config.repetitions, n, self.buckets)
        counts.scatter_add_(2, codes, mask[None].float().expand_as(codes))
        return sums, counts, codes, psi, mask

    def _finish(self, blocks: torch.Tensor) -> torch.Tensor:
        out = blocks.permute(1, 0, 2, 3).reshape(blocks.shape[1], -1)  # [N, R * B * d_proj]
        return out @ self.final.T if self.final is not None else out

    def queries(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Query FDEs ``[N, width]``: per bucket the sum of the projected tokens."""
        sums = self._blocks(x, mask)[0]
        return self._finish(sums)

    def documents(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Document FDEs ``[N, width]``: per bucket the average; empty buckets filled (``fill_empty``)."""
        sums, counts, codes, psi, mask = self._blocks(x, mask)
        blocks = sums / counts.clamp(min=1).unsqueeze(-1)
        if self.config.fill_empty and self.config.k_sim > 0:
            b = torch.arange(self.buckets)
            xor = codes.unsqueeze(-1) ^ b  # [R, N, T, B]
            dist = sum(((xor >> i) & 1) for i in range(self.config.k_sim))
            dist = dist.masked_fill(~mask[None, :, :, None], self.config.k_sim + 1)
            nearest = dist.argmin(dim=2)  # [R, N, B]: the first token at the least distance
            fill = psi.gather(2, nearest.unsqueeze(-1).expand(*nearest.shape, self.d_proj))
            empty = (counts == 0) & mask.any(1)[None, :, None]
            blocks = torch.where(empty.unsqueeze(-1), fill, blocks)
        return self._finish(blocks)


def maxsim(q: torch.Tensor, q_mask: torch.Tensor | None, d: torch.Tensor, d_mask: torch.Tensor | None,
           block: int = 256) -> torch.Tensor:
    """Exact late-interaction scores ``[Nq, Nd]``: ``sum_i max_j <q_i, d_j>`` over real tokens
    (``losses.similarity.maxsim_similarity``, ``block`` documents at a time)."""
    q, d = zero_padding(q, q_mask), zero_padding(d, d_mask)
    return torch.cat([maxsim_similarity(q, d[start:start + block]) for start in range(0, d.shape[0], block)], dim=1)


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Token sets ``x`` [N, T, d] in float with the tokens outside ``mask`` zeroed: the padding
    convention of ``losses.similarity`` (``token_mask``), for sets that carry an explicit mask."""
    x = x.float()
    return x if mask is None else x * mask[..., None].to(x.dtype)


class MuveraIndex:
    """A corpus of token-vector sets: FDEs for candidate search, the sets kept for exact re-ranking."""

    def __init__(self, docs: torch.Tensor, doc_mask: torch.Tensor | None = None, config: FDEConfig | None = None):
        self.fde = FDE(docs.shape[-1], config)
        self.docs, self.doc_mask = docs, doc_mask
        self.doc_fde = self.fde.documents(docs, doc_mask)

    def candidates(self, q: torch.Tensor, q_mask: torch.Tensor | None = None, n: int = 100) -> torch.Tensor:
        """``[Nq, n]`` document ids by FDE inner product, best first."""
        scores = self.fde.queries(q, q_mask) @ self.doc_fde.T
        return scores.topk(min(n, scores.shape[1]), dim=1).indices

    def search(self, q: torch.Tensor, q_mask: torch.Tensor | None = None, k: int = 10,
               candidates: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, ids) ``[Nq, k]``: the FDE candidates re-ranked by exact MaxSim."""
        cand = self.candidates(q, q_mask, candidates)  # [Nq, C]
        docs = self.docs[cand].float()  # [Nq, C, T, d]
        d_mask = self.doc_mask[cand].bool() if self.doc_mask is not None else torch.ones(docs.shape[:3], dtype=torch.bool)
        q_mask = torch.ones(q.shape[:2], dtype=torch.bool) if q_mask is None else q_mask.bool()
        sim = torch.einsum("aid,acjd->acij", q.float(), docs).masked_fill(~d_mask[:, :, None, :], float("-inf"))
        exact = sim.max(-1).values.masked_fill(~q_mask[:, None, :], 0.0).sum(-1)  # [Nq, C]: MaxSim
        top = exact.topk(min(k, cand.shape[1]), dim=1)
        return top.values, cand.gather(1, top.indices)


# ---------------------------------------------------------------- embedkit eval: data.eval.retrieval=muvera


@dataclass
class MuveraRetrieval:
    """``data.eval.retrieval=muvera``: the FDE settings and ``candidates``, how many of each query's
    candidates (the best by FDE) exact MaxSim re-ranks."""

    fde: FDEConfig
    candidates: int = 100

    @classmethod
    def from_config(cls, section: dict) -> "MuveraRetrieval":
        """From the ``data.eval.muvera`` section (``k_sim``, ``d_proj``, ``repetitions``, ``candidates``)."""
        return cls(FDEConfig(k_sim=section["k_sim"], d_proj=section["d_proj"], repetitions=section["repetitions"]),
                   candidates=section["candidates"])

    def check_model(self, encoder) -> None:
        """UserError unless ``encoder`` gives token-vector sets (its pooling head is ``multi_vector``);
        called before anything is encoded."""
        from embedkit.pooling.multi_vector import MultiVectorPooling

        pooling = getattr(encoder, "pooling", None)
        if not isinstance(pooling, MultiVectorPooling):
            raise single_vector_error(type(pooling).__name__ if pooling is not None else type(encoder).__name__)


def single_vector_error(what: str) -> UserError:
    return UserError(f"data.eval.retrieval=muvera: the model ({what}) gives one vector per input; MUVERA ranks "
                     "token-vector sets (model.pooling=multi_vector); use data.eval.retrieval=exact")


def _in_blocks(encode, x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``encode(x_block, mask_block)`` over blocks of sets: the fill step holds [R, n, T, 2^k_sim] codes."""
    mask = token_mask(x)
    return torch.cat([encode(x[i : i + block], mask[i : i + block]) for i in range(0, len(x), block)])


def muvera_row_scores(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_index: Sequence[int],
    candidate_index: Sequence[Sequence[int]],
    settings: MuveraRetrieval,
    normalize: bool = True,
) -> tuple[torch.Tensor, dict]:
    """(scores ``[R, Cmax]``, info) of each MMEB row's query against its own candidates, by MUVERA.

    ``queries [Nq, T, d]``, ``candidates [Nc, T, d]``: the unique token-vector sets (zero vectors pad);
    rows as in ``retrieval.row_scores``. Per row, the FDE inner product ranks the row's candidates;
    its best ``settings.candidates`` get their exact MaxSim (``losses.similarity.maxsim_similarity``, the
    score ``row_scores`` gives every candidate), and the rest keep their FDE order below all of them:
    ``FDE - (the rest's best FDE) + (the lowest exact score) - 1``. Re-ranking every candidate gives
    exactly ``row_scores``. Rows are padded with -inf. ``info``: the FDE size and bytes per set, the
    mean bytes of a token set's real tokens, the candidates re-ranked, and the scoring seconds.
    """
    if queries.dim() != 3 or candidates.dim() != 3:
        raise single_vector_error(f"embeddings of shape {tuple(queries.shape[1:])}")
    start = time.perf_counter()
    q, c = queries.float(), candidates.float()
    if normalize:
        q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
    fde = FDE(q.shape[-1], settings.fde)
    q_fde, c_fde = _in_blocks(fde.queries, q), _in_blocks(fde.documents, c)
    approx = scores_by_row(q_fde, c_fde, query_index, candidate_index,
                           lambda qb, cb: torch.einsum("bw,bcw->bc", qb, cb),
                           block=row_block(candidate_index, fde.width))
    out = torch.full_like(approx, float("-inf"))
    k = settings.candidates
    for r, (qi, ci) in enumerate(zip(query_index, candidate_index)):
        n = len(ci)
        if n == 0:
            continue
        fde_scores = approx[r, :n]
        picked = fde_scores.topk(min(k, n)).indices
        ids = torch.as_tensor(list(ci), dtype=torch.long)[picked]
        exact = maxsim_similarity(q[qi : qi + 1], c[ids])[0]
        row = torch.empty(n, dtype=out.dtype)
        rest = torch.ones(n, dtype=torch.bool)
        rest[picked] = False
        if rest.any():  # the others keep their FDE order, below every exact score
            row[rest] = fde_scores[rest] - fde_scores[rest].max() + exact.min() - 1
        row[picked] = exact
        out[r, :n] = row
    seconds = time.perf_counter() - start
    real = token_mask(c).sum(dim=-1).float()
    info = {"fde_numbers": fde.width, "fde_bytes": 4 * fde.width,
            "token_set_bytes": round(float(real.mean()) * c.shape[-1] * 4, 1) if len(real) else 0.0,
            "reranked": min(k, approx.shape[1]), "seconds": round(seconds, 4)}
    return out, info
