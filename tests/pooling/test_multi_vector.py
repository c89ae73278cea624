"""Multi-vector late interaction (``model.pooling=multi_vector``): MaxSim (summed, and averaged over the
query's tokens as the losses train by default) against a direct loop, the one contrastive core scoring
token sets by MaxSim (bidirectional, hardness-weighted, false negatives masked) against a direct loop, the head's padding invariance and pruning, and GradCache (chunks) ==
one graph on the tiny demo model with dropout on."""

import math

import pytest
import torch

from embedkit.eval.retrieval import row_scores
from embedkit.losses.base import CandidateMask, Temperature, contrastive_loss
from embedkit.losses.hardness_weighted import HardnessWeighted
from embedkit.losses.infonce import InfoNCE
from embedkit.losses.similarity import maxsim_similarity, mean_maxsim_similarity, similarity_for
from embedkit.pooling.multi_vector import MultiVectorPooling
from tests.helpers.variant_batches import assert_cached_equals_one_graph, module_and_batches

TAU, ALPHA = 0.1, 2.0


def token_sets(n, T, d, g):
    """[n, T, d] unit token vectors, each set with 1..T real tokens first, zero padding after."""
    x = torch.nn.functional.normalize(torch.randn(n, T, d, generator=g, dtype=torch.float64), dim=-1)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    return x * (torch.arange(T)[None, :] < lengths[:, None])[..., None], lengths.tolist()


def direct_maxsim(a, la, b, lb):
    return sum(max(float(a[t] @ b[u]) for u in range(lb)) for t in range(la))


def test_maxsim_matches_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    a, la = token_sets(4, 5, 8, g)
    b, lb = token_sets(6, 7, 8, g)
    s = maxsim_similarity(a, b)
    assert s.shape == (4, 6)
    for i in range(4):
        for j in range(6):
            assert abs(s[i, j].item() - direct_maxsim(a[i], la[i], b[j], lb[j])) <= 1e-6
    assert similarity_for(a) is maxsim_similarity


def direct_direction(score, targets, keys_of_columns, target_keys):
    """Mean of -log softmax at the target over logits s/τ + α·s off-target, copies dropped."""
    total = 0.0
    for r, t in enumerate(targets):
        logits = []
        for c, s in enumerate(score[r]):
            if c != t and keys_of_columns[c] == target_keys[r]:
                continue  # a false negative: out of the softmax
            logits.append((s / TAU + (ALPHA * s if c != t else 0.0), c == t))
        top = max(x for x, _ in logits)
        lse = top + math.log(sum(math.exp(x - top) for x, _ in logits))
        total -= next(x for x, is_t in logits if is_t) - lse
    return total / len(targets)


def test_contrastive_core_scores_token_sets_by_maxsim_with_the_false_negative_mask():
    g = torch.Generator().manual_seed(1)
    B, K, T, d = 4, 2, 5, 8
    q, lq = token_sets(B, T, d, g)
    p, lp = token_sets(B, T, d, g)
    n, ln = token_sets(B * K, T, d, g)
    n[1], ln[1] = p[2], lp[2]  # example 0's second negative is a copy of example 2's positive
    keys = torch.arange(B + B * K, dtype=torch.int64) + 100
    keys[B + 1] = keys[2]
    out = contrastive_loss(q, p, n.view(B, K, T, d), temperature=Temperature(TAU, False)(), rows=slice(1, 4),
                           alpha=ALPHA, bidirectional=True, mask=CandidateMask(keys))
    cands, lc = torch.cat([p, n]), lp + ln
    rows = [1, 2, 3]
    q2c = [[direct_maxsim(q[i], lq[i], cands[c], lc[c]) for c in range(len(cands))] for i in rows]
    c2q = [[direct_maxsim(q[j], lq[j], p[i], lp[i]) for j in range(B)] for i in rows]  # s(q_j, p_i)
    expected_q2c = direct_direction(q2c, rows, keys.tolist(), [keys[i].item() for i in rows])
    expected_c2q = direct_direction(c2q, rows, keys[:B].tolist(), [keys[i].item() for i in rows])
    assert abs(out.parts["q2c"].item() - expected_q2c) <= 1e-6
    assert abs(out.loss.item() - (expected_q2c + expected_c2q) / 2) <= 1e-6
    assert out.parts["masked_negatives"].item() == 1  # row 2 drops the copy of its positive


def test_mean_maxsim_matches_a_direct_loop():
    g = torch.Generator().manual_seed(3)
    a, la = token_sets(4, 5, 8, g)
    b, lb = token_sets(6, 7, 8, g)
    a[3] = 0  # a set with no real token scores 0
    s = mean_maxsim_similarity(a, b)
    for i in range(3):
        for j in range(6):
            assert abs(s[i, j].item() - direct_maxsim(a[i], la[i], b[j], lb[j]) / la[i]) <= 1e-6
    assert (s[3] == 0).all() and s.abs().max() <= 1 + 1e-12
    assert similarity_for(a, "mean") is mean_maxsim_similarity and similarity_for(a, "sum") is maxsim_similarity
    with pytest.raises(ValueError, match="maxsim: expected one of sum, mean, got 'max'"):
        similarity_for(a, "max")


def test_losses_train_on_mean_maxsim_by_default_against_a_direct_loop():
    """hardness_weighted (and infonce) score token sets by MaxSim averaged over the query's tokens
    unless ``maxsim=sum``: both directions, rows, the false-negative mask, against direct loops."""
    g = torch.Generator().manual_seed(4)
    B, K, T, d = 4, 1, 6, 8
    q, lq = token_sets(B, T, d, g)
    p, lp = token_sets(B, T, d, g)
    n, ln = token_sets(B * K, T, d, g)
    keys = torch.arange(B + B * K, dtype=torch.int64)
    keys[B] = keys[1]  # example 0's negative copies example 1's positive
    loss = HardnessWeighted(alpha=ALPHA, temperature=TAU, bidirectional=True)
    assert loss.maxsim == "mean" and InfoNCE().maxsim == "mean"
    out = loss(q, p, n.view(B, K, T, d), rows=slice(0, 3), mask=CandidateMask(keys))
    cands, lc = torch.cat([p, n]), lp + ln
    rows = [0, 1, 2]
    q2c = [[direct_maxsim(q[i], lq[i], cands[c], lc[c]) / lq[i] for c in range(len(cands))] for i in rows]
    c2q = [[direct_maxsim(q[j], lq[j], p[i], lp[i]) / lq[j] for j in range(B)] for i in rows]
    expected_q2c = direct_direction(q2c, rows, keys.tolist(), [keys[i].item() for i in rows])
    expected_c2q = direct_direction(c2q, rows, keys[:B].tolist(), [keys[i].item() for i in rows])
    assert abs(out.parts["q2c"].item() - expected_q2c) <= 1e-6
    assert abs(out.parts["c2q"].item() - expected_c2q) <= 1e-6
    summed = InfoNCE(temperature=TAU, bidirectional=True, maxsim="sum")(q, p)
    plain = contrastive_loss(q, p, temperature=Temperature(TAU, False)(), bidirectional=True)  # the core: sum
    assert abs(summed.loss.item() - plain.loss.item()) <= 1e-12


def test_mean_maxsim_compares_queries_of_different_lengths_in_c2q():
    """c2q ranks QUERIES for a candidate: the sum favours the longest query, the mean does not.
    Candidate p = one token e; its query matches it exactly (1 token), another query has 8 tokens at
    cosine 0.5 to it: the sum scores the wrong query 4 > 1, the mean 0.5 < 1."""
    e = torch.eye(4, dtype=torch.float64)[0]
    half = torch.nn.functional.normalize(e + torch.eye(4, dtype=torch.float64)[1] * 3**0.5, dim=0)  # cos 0.5 to e
    own = torch.zeros(1, 8, 4, dtype=torch.float64)
    own[0, 0] = e
    long = half.expand(1, 8, 4).clone()
    queries, p = torch.cat([own, long]), own
    assert maxsim_similarity(queries, p)[:, 0].argmax() == 1  # the long query wins by the sum
    assert mean_maxsim_similarity(queries, p)[:, 0].argmax() == 0


def test_head_is_padding_invariant_and_keeps_the_last_tokens():
    torch.manual_seed(0)
    head = MultiVectorPooling(hidden_size=6, dim=4, max_tokens=3)
    h = torch.randn(2, 5, 6)
    right = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    h_left = torch.stack([torch.roll(h[0], 1, 0), torch.roll(h[1], 3, 0)])
    h[right == 0] = float("nan")  # padding can hold anything
    h_left[left == 0] = float("nan")
    out = head(h, right)
    torch.testing.assert_close(out, head(h_left, left), atol=0, rtol=0)
    assert out.shape == (2, 3, 4) and not out.isnan().any()
    torch.testing.assert_close(out.norm(dim=-1), torch.tensor([[1.0, 1, 1], [1, 1, 0]]))
    expected = torch.nn.functional.normalize(head.proj(h[0, 1:4]), dim=-1)  # 4 real tokens: the last 3
    torch.testing.assert_close(out[0], expected)


def test_gradcache_equals_one_graph():
    """With the losses' default, MaxSim averaged over the query's tokens."""
    module, batch = module_and_batches("model.pooling=multi_vector", "model.pooling.dim=16",
                                       "model.pooling.max_tokens=12", "loss=hardness_weighted")
    assert module.encoder.embedding_dim == 16 and module.loss_fn.maxsim == "mean"
    out = assert_cached_equals_one_graph(module, batch)
    assert out.parts["masked_negatives"] > 0


def test_eval_row_scores_rank_token_sets_by_exact_maxsim():
    g = torch.Generator().manual_seed(2)
    q, lq = token_sets(3, 4, 8, g)
    c, lc = token_sets(5, 6, 8, g)
    rows = [[0, 1, 2], [3, 4, 0, 1], [2]]
    scores = row_scores(q.float(), c.float(), [0, 1, 2], rows)
    assert scores.shape == (3, 4) and scores[2, 1:].isinf().all()
    for r, cands in enumerate(rows):
        for k, j in enumerate(cands):
            assert abs(scores[r, k].item() - direct_maxsim(q[r], lq[r], c[j], lc[j])) <= 1e-5
