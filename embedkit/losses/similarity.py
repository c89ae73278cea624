"""Similarity between embeddings: the dot product of single vectors and late interaction (MaxSim) of
token-vector sets.

Inputs: queries ``a`` [r, D] or [r, Ta, d], candidates ``b`` [C, D] or [C, Tb, d]; every function
returns the [r, C] matrix of scores. The contrastive core (``losses.base``) trains with these scores
and evaluation (``eval/``) ranks with them, so both import this module and neither imports the other.
Token-vector sets are padded with zero vectors (``token_mask``), the multi-vector head's convention.
"""

from __future__ import annotations

import torch


def dot_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s(a_i, b_j) = a_i · b_j for single vectors a [r, D], b [C, D]: [r, C]."""
    return a @ b.T


def token_mask(x: torch.Tensor) -> torch.Tensor:
    """Bool [..., T]: the real tokens of token-vector sets [..., T, d]. A multi-vector head pads each
    set to a fixed length with zero vectors and L2-normalises its real tokens, so a token is real
    exactly when its vector is non-zero: the mask travels inside the tensor (through GradCache and
    the distributed gather, which move one tensor of one shape)."""
    return (x != 0).any(dim=-1)


def maxsim_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Late interaction (ColBERT, Khattab & Zaharia 2020, arXiv 2004.12832; ColPali, arXiv 2407.01449):
    s(a_i, b_j) = Σ over the real tokens t of a_i of max over the real tokens u of b_j of a_it · b_ju,
    for token-vector sets a [r, Ta, d], b [C, Tb, d] (padding: zero vectors, ``token_mask``): [r, C].
    A set with no real token scores 0. Token slots that are padding in every set are cut first (exact:
    they take no part), so a fixed ``max_tokens`` costs nothing beyond the longest set."""
    a, b = a[:, : _used_slots(a)], b[:, : _used_slots(b)]
    dots = torch.einsum("rtd,cud->rctu", a, b)
    real_b = token_mask(b)[None, :, None, :]  # [1, C, 1, Tb]
    best = dots.masked_fill(~real_b, float("-inf")).amax(dim=-1)  # [r, C, Ta]
    keep = token_mask(a)[:, None, :] & real_b.any(dim=-1)
    return torch.where(keep, best, torch.zeros((), dtype=best.dtype, device=best.device)).sum(dim=-1)


def mean_maxsim_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MaxSim averaged over the query's real tokens: ``maxsim_similarity(a, b)[i, j] / |a_i|`` (a set
    with no real token scores 0), in [-1, 1] like the cosine of single vectors: [r, C].

    Why, for training logits: the sum grows with the query's token count, so s/τ at the τ ≈ 0.02
    single-vector losses use spans ±|a_i|/τ (hundreds): the softmax saturates, and on the demo the
    model escaped into the zero-gradient state where every token vector is the same (loss log B).
    In q2c a row's scale 1/|a_i| leaves its ranking unchanged (eval ranks identically); in c2q the
    softmax runs over queries of different lengths, where the sum favours the longest query by
    ~1/τ per extra token and the mean compares them fairly. τ, LLaVE's α and UniME's margin keep
    the meaning they have for cosine similarity."""
    count = token_mask(a).sum(dim=-1, keepdim=True).clamp(min=1)
    return maxsim_similarity(a, b) / count.to(a.dtype)


def _used_slots(x: torch.Tensor) -> int:
    """1 + the last token slot that is real in any set of ``x`` [n, T, d] (at least 1)."""
    used = token_mask(x).any(dim=0).nonzero()
    return int(used[-1]) + 1 if len(used) else 1


#: ``maxsim`` choices: how a token set's MaxSim is reduced over the query's tokens
MAXSIM = {"sum": maxsim_similarity, "mean": mean_maxsim_similarity}


def similarity_for(x: torch.Tensor, maxsim: str = "sum"):
    """The similarity the embeddings' shape calls for: dot for [n, D], MaxSim for token sets [n, T, d],
    summed over the query's tokens (``maxsim="sum"``, ColBERT's score) or averaged (``"mean"``,
    ``mean_maxsim_similarity``: the losses' default). Per query both rank alike."""
    if maxsim not in MAXSIM:
        raise ValueError(f"maxsim: expected one of {', '.join(MAXSIM)}, got {maxsim!r}")
    if x.dim() == 2:
        return dot_similarity
    if x.dim() == 3:
        return MAXSIM[maxsim]
    raise ValueError(f"embeddings must be [n, D] or token sets [n, T, d], got shape {tuple(x.shape)}")
