"""Binary and int8 embeddings: codes, their scores and the bytes they cost, scored
beside the float embeddings by ``embedkit eval quantize=``.

Binary (the training-free sign binarisation that "Binary Embedding-based Retrieval at Tencent",
Gan et al., arXiv 2302.08714, takes as its baseline and stores as Hamming codes; its learned
recurrent binarisation is not implemented here)::

    b_i     = [x_i > 0]                       one bit per dimension, packed 8 to a byte (numpy bit order)
    ham     = popcount(b_q XOR b_c)
    score   = D - 2 * ham                     = <2b_q - 1, 2b_c - 1>, so ranking by it is ranking by -ham

Rescoring (``rescore=true``): the ``rescore_k`` best candidates by Hamming distance are re-ranked by
the float query against the candidates' sign vectors, ``<q, 2b_c - 1>``: documents stay binary, only
the query is kept in float (the asymmetric distance of the paper's Sec. 3.3, here on the sign codes).

int8 (scalar quantisation with per-dimension ranges, calibrated on the candidates)::

    lo_j, hi_j  = min_c x_cj, max_c x_cj
    code_j      = clamp(round((x_j - lo_j) / (hi_j - lo_j) * 255) - 128, -128, 127)
    x^_j        = lo_j + (code_j + 128) * (hi_j - lo_j) / 255
    score       = <x^_q, x^_c>                   queries quantised with the candidates' ranges

Bytes per vector: float32 ``4 D``; int8 ``D`` (plus ``8 D`` bytes of ranges per corpus, not per
vector); binary ``ceil(D / 8)``.
"""

from __future__ import annotations

import math

import torch

from embedkit.eval.retrieval import scores_by_row

MODES = ("binary", "int8")

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def check_quantizable(encoder, modes) -> None:
    """UserError when ``modes`` are asked of a model whose embeddings are token-vector sets
    (``model.pooling=multi_vector``): the codes and scores here are for one vector per input."""
    from embedkit.errors import UserError
    from embedkit.pooling.multi_vector import MultiVectorPooling

    if modes and isinstance(getattr(encoder, "pooling", None), MultiVectorPooling):
        raise UserError(f"quantize={','.join(modes)}: quantised scoring is for one vector per input; this model "
                        "gives token-vector sets (model.pooling=multi_vector): evaluate it unquantised, or "
                        "with data.eval.retrieval=muvera")


def bytes_per_vector(mode: str, dim: int) -> int:
    return {"float": 4 * dim, "int8": dim, "binary": math.ceil(dim / 8)}[mode]


# ---------------------------------------------------------------- binary


def binarize(x: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` float -> ``[N, ceil(D/8)]`` uint8: bit ``x > 0``, most significant bit first."""
    bits = (x > 0).to(torch.uint8)
    pad = (-bits.shape[-1]) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (bits.view(*bits.shape[:-1], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """Packed codes -> ``[..., dim]`` float of +1 / -1 (the sign vector ``2b - 1``)."""
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
    bits = (codes.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :dim].float() * 2 - 1


def hamming(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Hamming distance of packed codes, broadcast over leading axes: ``popcount(q ^ c)`` summed over bytes."""
    return _POPCOUNT[(q ^ c).long()].sum(-1, dtype=torch.int64)


# ---------------------------------------------------------------- int8


def int8_ranges(x: torch.Tensor) -> torch.Tensor:
    """``[2, D]``: per-dimension (min, max) of the calibration set (the candidates)."""
    x = x.float()
    return torch.stack([x.min(0).values, x.max(0).values])


def int8_quantize(x: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    lo, hi = ranges[0], ranges[1]
    scale = (hi - lo).clamp(min=1e-12) / 255
    return (torch.round((x.float() - lo) / scale) - 128).clamp(-128, 127).to(torch.int8)


def int8_dequantize(codes: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    lo, hi = ranges[0], ranges[1]
    return lo + (codes.float() + 128) * (hi - lo).clamp(min=1e-12) / 255


# ---------------------------------------------------------------- MMEB rows


def quantized_row_scores(queries: torch.Tensor, candidates: torch.Tensor, query_index, candidate_index,
                         mode: str, *, normalize: bool = True, rescore: bool = False,
                         rescore_k: int = 10) -> torch.Tensor:
    """Like ``retrieval.row_scores``, with candidates (and queries, unless rescored) quantised by ``mode``."""
    q, c = queries.float(), candidates.float()
    if normalize:
        q, c = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(c, dim=-1)
    dim = q.shape[1]
    if mode == "int8":
        ranges = int8_ranges(c)
        cq = int8_dequantize(int8_quantize(c, ranges), ranges)
        qq = int8_dequantize(int8_quantize(q, ranges), ranges)
        return scores_by_row(qq, cq, query_index, candidate_index, lambda a, b: torch.einsum("bd,bcd->bc", a, b))
    if mode != "binary":
        raise ValueError(f"quantize: expected one of {MODES}, got {mode!r}")
    qb, cb = binarize(q), binarize(c)
    scores = scores_by_row(qb, cb, query_index, candidate_index, lambda a, b: dim - 2 * hamming(a[:, None], b))
    if not rescore:
        return scores
    # rescoring: the top rescore_k by Hamming, re-ranked by <q, sign(c)>, placed above all the others
    signs = unpack_signs(cb, dim)
    fine = scores_by_row(q, signs, query_index, candidate_index, lambda a, b: torch.einsum("bd,bcd->bc", a, b))
    bound = float(fine[torch.isfinite(fine)].abs().max()) if torch.isfinite(fine).any() else 0.0
    k = min(rescore_k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    out = scores - (dim + bound + 1)  # the others, still in Hamming order, all below any rescored one
    kept = torch.isfinite(scores.gather(1, top))
    out.scatter_(1, top, torch.where(kept, fine.gather(1, top), scores.gather(1, top)))
    return out
