"""Graded and set retrieval metrics (embedkit/eval/ranking.py) against a plain reference, hand-worked
cases, the VLM2Vec grade-misalignment convention, the error lines, and the vectorised speed."""

from __future__ import annotations

import math
import random

import pytest
import torch

from embedkit.errors import UserError
from embedkit.eval import ranking, retrieval

# ------------------------------------------------------------------ independent reference


def ref_order(row: list[float]) -> list[int]:
    """The written tie rule: descending score, equal scores by candidate index ascending."""
    return sorted(range(len(row)), key=lambda c: (-row[c], c))


def ref_ndcg(row: list[float], rel: dict, k: int, gain: str) -> float:
    """NDCG@k from the formula, one query: sum_{i<k} g(rel_i) / log2(i + 2), IDCG over own grades."""
    g = (lambda r: r) if gain == "linear" else (lambda r: 2.0**r - 1.0)
    ranked = ref_order(row)[:k]
    dcg = sum(g(rel.get(c, 0)) / math.log2(i + 2) for i, c in enumerate(ranked))
    ideal = sorted(rel.values(), reverse=True)[:k]
    idcg = sum(g(r) / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def random_run(rng: random.Random):
    q, c = rng.randint(1, 6), rng.randint(1, 25)
    levels = rng.randint(1, 6)  # few score levels -> many ties
    scores = [[rng.randint(0, levels) / levels for _ in range(c)] for _ in range(q)]
    graded = rng.random() < 0.5
    qrels = []
    for _ in range(q):
        chosen = rng.sample(range(c), rng.randint(0, min(c, 6)))
        grade = (lambda: rng.choice([0, 1, 2, 3])) if graded else (lambda: rng.choice([0.0, 0.5, 1.0, 2.5]))
        qrels.append({ci: grade() for ci in chosen})
    return scores, qrels


@pytest.mark.parametrize("gain", ["linear", "exponential"])
def test_ndcg_at_5_equals_the_reference_on_200_random_graded_runs_with_ties(gain):
    rng = random.Random(28)
    checked = 0
    for _ in range(200):
        scores, qrels = random_run(rng)
        for k in (5, 1, 30):
            got = ranking.ndcg(ranking.judge(torch.tensor(scores, dtype=torch.float64), qrels, allow_empty=True), k, gain)
            want = [ref_ndcg(row, rel, k, gain) for row, rel in zip(scores, qrels)]
            assert got.tolist() == pytest.approx(want, abs=1e-9, rel=0)
            checked += len(want)
    assert checked > 1000


@pytest.mark.parametrize("sort_from", [0, 10**9])
def test_counted_and_sorted_ranks_follow_the_tie_rule_in_any_chunking(monkeypatch, sort_from):
    monkeypatch.setattr(ranking, "_SORT_FROM", sort_from)  # 0: always sort; 10**9: always count
    rng = random.Random(3)
    for chunk in (1 << 24, 1, 7):
        monkeypatch.setattr(ranking, "_CHUNK", chunk)
        for _ in range(30):
            scores, qrels = random_run(rng)
            got = ranking.judge(scores, qrels, allow_empty=True)
            want = [ref_order(scores[q]).index(c) for q, c in zip(got.query.tolist(), got.candidate.tolist())]
            assert got.rank.tolist() == want


# ------------------------------------------------------------------ hand-worked cases


def test_ndcg_hand_worked_linear_and_exponential():
    scores = [[0.9, 0.8, 0.7, 0.6]]
    qrels = [{1: 3, 3: 1}]
    dcg = 3 / math.log2(3) + 1 / math.log2(5)  # ranks 1 and 3
    idcg = 3 / math.log2(2) + 1 / math.log2(3)
    assert ranking.ndcg_at_k(scores, qrels, 5) == pytest.approx(dcg / idcg, abs=1e-12)
    dcg_e = 7 / math.log2(3) + 1 / math.log2(5)
    idcg_e = 7 + 1 / math.log2(3)
    assert ranking.ndcg_at_k(scores, qrels, 5, "exponential") == pytest.approx(dcg_e / idcg_e, abs=1e-12)
    assert ranking.ndcg_at_k(scores, qrels, 1) == 0.0  # only candidate 0 (grade 0) in the top 1


def test_ties_rank_by_candidate_index_for_every_metric():
    judged = ranking.judge([[0.5, 0.5, 0.5]], [{2: 1}])
    assert judged.rank.tolist() == [2]
    assert ranking.hit_at_k(judged, 1).item() == 0.0
    assert ranking.hit_at_k(judged, 3).item() == 1.0
    assert ranking.reciprocal_rank(judged).item() == pytest.approx(1 / 3)
    assert ranking.ndcg(judged, 5).item() == pytest.approx(1 / math.log2(4))  # = 0.5
    assert ranking.judge([[0.5, 0.5, 0.5]], [{0: 1}]).rank.tolist() == [0]


def test_k_larger_than_the_corpus():
    judged = ranking.judge([[1.0, 0.0]], [{0: 1, 1: 2}])
    want = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert ranking.ndcg(judged, 10).item() == pytest.approx(want, abs=1e-12)
    assert ranking.recall_at_k(judged, 10).item() == 1.0
    assert ranking.hit_at_k(judged, 10).item() == 1.0


def test_a_query_with_no_relevant_candidate_scores_zero_when_allowed():
    scores = [[0.3, 0.2], [0.1, 0.9]]
    qrels = [{0: 1}, {1: 0}]  # query 1: a grade-0 qrel only
    report = ranking.ranking_report(scores, qrels, ks=(1,), allow_empty=True)
    assert report == {"ndcg_linear@1": 0.5, "ndcg_exponential@1": 0.5, "hit@1": 0.5, "recall@1": 0.5, "mrr": 0.5}
    with pytest.raises(UserError, match="query 1 has no relevant candidate"):
        ranking.judge(scores, qrels)
    assert ranking.ndcg(ranking.judge([[1.0]], [{}], allow_empty=True), 5).item() == 0.0


def test_recall_is_the_fraction_of_relevant_and_hit_is_any():
    judged = ranking.judge([[0.9, 0.8, 0.7, 0.6, 0.5]], [{0: 1, 3: 1, 4: 2}])
    assert ranking.recall_at_k(judged, 2).item() == pytest.approx(1 / 3)
    assert ranking.hit_at_k(judged, 2).item() == 1.0
    assert ranking.recall_at_k(judged, 4).item() == pytest.approx(2 / 3)
    assert ranking.recall_at_k(judged, 5).item() == 1.0


def test_mrr_and_mrr_at_k():
    judged = ranking.judge([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4]], [{3: 1}, {3: 1, 0: 2}])
    assert ranking.reciprocal_rank(judged).tolist() == pytest.approx([1 / 4, 1.0])
    assert ranking.reciprocal_rank(judged, k=2).tolist() == pytest.approx([0.0, 1.0])
    assert ranking.ranking_report([[0.9, 0.8, 0.7, 0.6]], [{3: 1}])["mrr"] == pytest.approx(0.25)


def test_local_scope_agrees_with_retrieval_p_at_1_and_its_recall_and_mrr():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (200, 8), generator=g).float()  # many ties, with the answer too
    scores[:5, 5:] = float("-inf")  # padding past short rows
    judged = ranking.judge(scores, [{0: 1}] * len(scores))
    assert ranking.hit_at_k(judged, 1).mean().item() == retrieval.precision_at_1(scores)["acc"]
    old = retrieval.ranking_metrics(scores, ks=(1, 5))
    assert ranking.hit_at_k(judged, 5).mean().item() == pytest.approx(old["recall@5"])
    assert ranking.reciprocal_rank(judged).mean().item() == pytest.approx(old["mrr"])


def test_numpy_scores_and_integer_types_are_accepted():
    np = pytest.importorskip("numpy")
    scores = np.array([[0.1, 0.9, 0.5]])
    assert ranking.ndcg_at_k(scores, [{np.int64(1): np.float32(2.0)}], 5) == 1.0


# ------------------------------------------------------------------ set retrieval


def test_set_retrieval_both_ways_hand_worked():
    # texts 0, 1 describe video 0; text 2 describes video 1
    sim = [[0.2, 0.9],   # text 0: video 1 first -> its video at rank 2
           [0.8, 0.1],   # text 1: video 0 first
           [0.5, 0.5]]   # text 2: tie -> video 0 first (index rule) -> its video at rank 2
    out = ranking.set_retrieval(sim, [0, 0, 1], ks=(1, 2))
    assert out["t2v"] == {"R@1": pytest.approx(1 / 3), "R@2": 1.0, "MdR": 2.0, "MnR": pytest.approx(5 / 3)}
    # video 0 column [0.2, 0.8, 0.5]: text 1 first (its own) -> rank 1
    # video 1 column [0.9, 0.1, 0.5]: text 0, text 2 -> its text 2 at rank 2
    assert out["v2t"] == {"R@1": 0.5, "R@2": 1.0, "MdR": 1.0, "MnR": 1.5}  # MdR: lower middle of [1, 2]
    # CLIP4Clip's groups: video 1 row = [best of texts 0,1 = 0.9, text 2 = 0.5] -> its group at rank 2 too
    assert ranking.set_retrieval(sim, [0, 0, 1], ks=(1, 2), v2t="group")["v2t"] == out["v2t"]


def test_v2t_text_and_group_rules_differ_when_another_video_has_many_texts():
    # video 0 has texts 0, 1, 2; video 1 has text 3. Video 1 scores texts [0.9, 0.8, 0.7, 0.6]
    sim = [[0.0, 0.9], [0.0, 0.8], [0.0, 0.7], [0.5, 0.6]]
    text = ranking.set_retrieval(sim, [0, 0, 0, 1], ks=(1, 2), v2t="text")["v2t"]
    group = ranking.set_retrieval(sim, [0, 0, 0, 1], ks=(1, 2), v2t="group")["v2t"]
    # video 0 scores texts [0, 0, 0, 0.5]: its first text at rank 2; video 1: its text at rank 4 of 4
    assert (text["R@1"], text["R@2"], text["MnR"]) == (0.0, 0.5, 3.0)
    # groups: video 0 -> [max 0, 0.5] own at rank 2; video 1 -> [max 0.9, 0.6] own at rank 2 of 2
    assert (group["R@1"], group["R@2"], group["MnR"]) == (0.0, 1.0, 2.0)
    # one text per video: the two rules agree
    g = torch.Generator().manual_seed(2)
    sq = torch.randint(0, 4, (30, 30), generator=g).float()
    assert ranking.set_retrieval(sq, list(range(30)), v2t="text") == ranking.set_retrieval(sq, list(range(30)),
                                                                                             v2t="group")


def test_set_retrieval_errors():
    with pytest.raises(UserError, match="video 1 has no text"):
        ranking.set_retrieval([[0.1, 0.2]], [0])
    with pytest.raises(UserError, match="text_video entry 5 is not a video index"):
        ranking.set_retrieval([[0.1, 0.2]], [5])
    with pytest.raises(UserError, match="text_video has 2 entries"):
        ranking.set_retrieval([[0.1, 0.2]], [0, 1])
    with pytest.raises(UserError, match="unknown v2t rule 'x'"):
        ranking.set_retrieval([[0.1]], [0], v2t="x")


# ------------------------------------------------------------------ the VLM2Vec convention


def test_vlm2vec_convention_misattaches_non_uniform_grades():
    # qrels order 5 then 2; list(set([5, 2])) == [2, 5], so grade 3 lands on candidate 2
    assert list(set([5, 2])) == [2, 5]
    scores = [[0.0, 0.0, 0.5, 0.0, 0.0, 0.9]]
    qrels = [{5: 3, 2: 1}]
    right = ranking.ndcg_at_k(scores, qrels, 5)
    buggy = ranking.ndcg_vlm2vec_convention(scores, qrels, 5)
    assert right == pytest.approx(1.0)
    idcg = 3 + 1 / math.log2(3)
    assert buggy == pytest.approx((1 + 3 / math.log2(3)) / idcg, abs=1e-12)
    assert buggy < right
    # keyed by corpus-ids: ids 7 and 1 -> set order [1, 7] -> candidate 2 (id 1) gets grade 3 too
    ids = [0, 0, 1, 0, 0, 7]
    assert ranking.ndcg_vlm2vec_convention(scores, qrels, 5, ids=ids) == pytest.approx(buggy)


def test_vlm2vec_convention_agrees_when_grades_are_binary():
    rng = random.Random(5)
    for _ in range(50):
        scores, qrels = random_run(rng)
        binary = [{c: 1 for c in rel} for rel in qrels]
        for gain in ranking.GAINS:
            assert ranking.ndcg_vlm2vec_convention(scores, binary, 5, gain, allow_empty=True) == pytest.approx(
                ranking.ndcg_at_k(scores, binary, 5, gain, allow_empty=True), abs=1e-12)


# ------------------------------------------------------------------ error lines


@pytest.mark.parametrize("qrels, message", [
    ([{3: 1}], r"qrels of query 0: candidate 3 is not an index in \[0, 3\)"),
    ([{-1: 1}], r"candidate -1 is not an index"),
    ([{"a": 1}], r"candidate 'a' is not an index"),
    ([{0: -1}], r"grade -1 of candidate 0 must be a finite number >= 0"),
    ([{0: float("nan")}], r"grade nan of candidate 0"),
    ([{0: "2"}], r"grade '2' of candidate 0"),
    ([{}], r"query 0 has no relevant candidate"),
    ([{0: 1}, {0: 1}], r"qrels has 2 queries but scores has 1 rows"),
    ([[0, 1]], r"qrels of query 0 must be a mapping"),
])
def test_malformed_qrels_are_one_line_errors(qrels, message):
    with pytest.raises(UserError, match=message) as info:
        ranking.judge([[0.1, 0.2, 0.3]], qrels)
    assert "\n" not in str(info.value)


def test_bad_scores_k_and_gain_are_one_line_errors():
    with pytest.raises(UserError, match="must be a \\[queries, candidates\\] matrix"):
        ranking.judge([0.1, 0.2], [{0: 1}])
    with pytest.raises(UserError, match="scores contain NaN"):
        ranking.judge([[float("nan"), 0.2]], [{0: 1}])
    with pytest.raises(UserError, match="at least one query and one candidate"):
        ranking.judge(torch.zeros(0, 3), [])
    judged = ranking.judge([[0.1, 0.2]], [{0: 1}])
    with pytest.raises(UserError, match="k must be a positive integer, got 0"):
        ranking.ndcg(judged, 0)
    with pytest.raises(UserError, match="unknown NDCG gain 'log'"):
        ranking.ndcg(judged, 5, "log")


def test_a_query_with_no_relevant_candidate_misses_even_with_k_past_the_corpus():
    judged = ranking.judge([[0.3, 0.2], [0.1, 0.9]], [{0: 1}, {}], allow_empty=True)
    assert ranking.hit_at_k(judged, 10).tolist() == [1.0, 0.0]
    assert ranking.recall_at_k(judged, 10).tolist() == [1.0, 0.0]
    assert ranking.reciprocal_rank(judged, k=10).tolist() == [1.0, 0.0]
    assert ranking.ndcg(judged, 10).tolist() == [1.0, 0.0]


def test_integer_scores_and_scores_that_need_grad_are_accepted():
    assert ranking.set_retrieval([[2, 1], [0, 3]], [0, 1], ks=(1,), v2t="group")["v2t"]["R@1"] == 1.0
    scores = torch.tensor([[0.1, 0.9]], requires_grad=True)
    assert ranking.ndcg_at_k(scores, [{1: 1}]) == 1.0


def test_vlm2vec_convention_ids_errors():
    with pytest.raises(UserError, match="ids has 1 entries but scores has 2 candidates"):
        ranking.ndcg_vlm2vec_convention([[0.1, 0.2]], [{0: 1}], ids=[0])
    with pytest.raises(UserError, match="ids give candidates 0 and 1 of query 0 the same id 'a'"):
        ranking.ndcg_vlm2vec_convention([[0.1, 0.2]], [{0: 1, 1: 2}], ids=["a", "a"])
