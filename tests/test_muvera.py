"""MUVERA fixed-dimensional encodings (issue 19, arXiv 2405.19588): the encodings against direct
loops over tokens and buckets, exact MaxSim, and the recall of the exact top 10 on a synthetic corpus."""

from __future__ import annotations

import math

import pytest
import torch

from embedkit.eval.muvera import FDE, FDEConfig, MuveraIndex, clustered_corpus, maxsim, recall_of_exact_top


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def direct_fde(fde: FDE, x: torch.Tensor, mask: torch.Tensor, document: bool) -> torch.Tensor:
    """One set at a time, token by token, bucket by bucket, as the paper states it."""
    c = fde.config
    out = []
    tokens = [x[t] for t in range(x.shape[0]) if mask[t]]
    for r in range(c.repetitions):
        def code(v, r=r):
            return sum((1 << i) for i in range(c.k_sim) if float(fde.planes[r, i] @ v) > 0)

        def psi(v, r=r):
            return fde.proj[r] @ v if fde.proj is not None else v

        codes = [code(v) for v in tokens]
        for b in range(fde.buckets):
            members = [psi(v) for v, k in zip(tokens, codes) if k == b]
            if members:
                block = sum(members) / (len(members) if document else 1)
            elif document and c.fill_empty and c.k_sim > 0:
                dist = [bin(k ^ b).count("1") for k in codes]
                block = psi(tokens[dist.index(min(dist))])
            else:
                block = torch.zeros(fde.d_proj)
            out.append(block)
    flat = torch.cat(out)
    return fde.final @ flat if fde.final is not None else flat


@pytest.mark.parametrize("config", [
    FDEConfig(k_sim=2, d_proj=3, repetitions=2, seed=1),
    FDEConfig(k_sim=3, d_proj=None, repetitions=1, seed=2),
    FDEConfig(k_sim=2, d_proj=3, repetitions=2, final_dim=7, seed=3),
    FDEConfig(k_sim=2, d_proj=4, repetitions=3, fill_empty=False, seed=4),
])
def test_fde_equals_a_direct_loop(config):
    fde = FDE(5, config)
    x = rand(4, 6, 5)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]], dtype=torch.bool)
    x = x.masked_fill(~mask[..., None], 123.0)  # padding must never count
    q, d = fde.queries(x, mask), fde.documents(x, mask)
    assert q.shape == d.shape == (4, fde.width)
    for i in range(4):
        torch.testing.assert_close(q[i], direct_fde(fde, x[i], mask[i], document=False), atol=1e-6, rtol=0)
        torch.testing.assert_close(d[i], direct_fde(fde, x[i], mask[i], document=True), atol=1e-6, rtol=0)


def test_one_bucket_without_projection_is_the_sum_against_the_mean():
    """k_sim = 0, no projection: <F(Q), F(P)> = sum_q <q, mean(P)> (a sanity anchor for the blocks)."""
    fde = FDE(6, FDEConfig(k_sim=0, d_proj=None, repetitions=1))
    q, p = rand(1, 3, 6), rand(1, 5, 6, seed=1)
    got = fde.queries(q) @ fde.documents(p).T
    torch.testing.assert_close(got[0, 0], (q[0] @ p[0].mean(0)).sum(), atol=1e-6, rtol=0)


def test_projection_is_a_scaled_sign_matrix_and_bits_are_simhash():
    fde = FDE(8, FDEConfig(k_sim=3, d_proj=4, repetitions=2))
    assert set((fde.proj * math.sqrt(4)).unique().tolist()) == {-1.0, 1.0}
    x = rand(2, 3, 8)
    codes = fde.bucket(x)
    for r in range(2):
        for n in range(2):
            for t in range(3):
                bits = [int(float(fde.planes[r, i] @ x[n, t]) > 0) for i in range(3)]
                assert int(codes[r, n, t]) == sum(b << i for i, b in enumerate(bits))


def test_maxsim_equals_a_direct_loop():
    q, d = rand(3, 4, 5), rand(6, 7, 5, seed=1)
    qm = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    dm = torch.arange(7)[None] < torch.tensor([7, 1, 3, 5, 2, 6])[:, None]
    got = maxsim(q, qm, d, dm, block=4)
    for a in range(3):
        for b in range(6):
            want = sum(max(float(q[a, i] @ d[b, j]) for j in range(7) if dm[b, j]) for i in range(4) if qm[a, i])
            assert abs(float(got[a, b]) - want) <= 1e-5


def test_fde_candidates_hold_the_exact_maxsim_top_10():
    """The documented settings (FDEConfig defaults: k_sim=4, d_proj=16, R=16, 4096 numbers) on 3000
    documents of 8-24 clustered tokens: recall@100 of the exact MaxSim top 10 >= 0.9 (measured 0.97)."""
    docs, doc_mask, queries, query_mask = clustered_corpus(num_docs=3000, num_queries=50)
    index = MuveraIndex(docs, doc_mask, FDEConfig())
    assert index.fde.width == 4096
    recall = recall_of_exact_top(index, queries, query_mask, k=10, candidates=100)
    assert recall >= 0.9, recall
    # re-ranked search returns the exact scores of the documents it found, best first
    scores, ids = index.search(queries[:5], query_mask[:5], k=10, candidates=100)
    exact = maxsim(queries[:5], query_mask[:5], docs, doc_mask)
    torch.testing.assert_close(scores, exact.gather(1, ids), atol=1e-5, rtol=0)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
