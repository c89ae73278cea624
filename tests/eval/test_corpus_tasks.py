"""Corpus tasks: folders read and checked, each kind scored as its definition says (fake encoders)."""

import json
import math

import pytest
import torch

from embedkit.errors import UserError
from embedkit.eval.corpus_tasks import evaluate_task, read_task, task_scores


def _write(folder, kind, queries, corpus, qrels, **spec):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"kind": kind, **spec}))
    for name, rows in (("queries", queries), ("corpus", corpus), ("qrels", qrels)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _docs_task(tmp_path):
    queries = [{"id": "q1", "text": "red"}, {"id": "q2", "text": "blue"}]
    corpus = [{"id": f"d{i}", "text": t} for i, t in enumerate(["red", "blue", "green", "red blue"])]
    qrels = [{"query": "q1", "doc": "d0", "grade": 2}, {"query": "q1", "doc": "d3", "grade": 1},
             {"query": "q2", "doc": "d1", "grade": 2}]
    return _write(tmp_path / "docs", "retrieval", queries, corpus, qrels)


def _dcg(grades):
    return sum(g / math.log2(i + 2) for i, g in enumerate(grades))


def test_retrieval_scores_graded_ndcg_over_the_whole_corpus(tmp_path):
    task = read_task(_docs_task(tmp_path))
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[0.9, 0.1], [0.0, 1.0], [0.3, 0.3], [0.99, 0.0]])  # q1 ranks d3 (grade 1) first
    out = task_scores(task, q, c, normalize=False)
    q1 = _dcg([1, 2]) / _dcg([2, 1])
    assert out["main"] == "ndcg_linear@5"
    assert out["score"] == pytest.approx((q1 + 1.0) / 2, abs=1e-12)
    assert out["metrics"]["hit@1"] == 1.0 and out["metrics"]["mrr"] == 1.0


def test_video_text_scores_both_ways(tmp_path):
    queries = [{"id": f"t{i}", "text": f"caption {i}"} for i in range(3)]
    corpus = [{"id": f"v{i}", "text": f"video {i}"} for i in range(2)]
    qrels = [{"query": "t0", "doc": "v0"}, {"query": "t1", "doc": "v1"}, {"query": "t2", "doc": "v1"}]
    task = read_task(_write(tmp_path / "vt", "video_text", queries, corpus, qrels))
    sim_q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # t1 prefers the wrong video
    out = task_scores(task, sim_q, torch.eye(2), normalize=False)
    assert out["main"] == "t2v/R@1" and out["score"] == pytest.approx(2 / 3)
    assert out["metrics"]["v2t/R@1"] == 1.0  # v0's best text is t0 (index order), v1's is t2


def test_moment_ranks_only_each_querys_candidates(tmp_path):
    queries = [{"id": "q", "text": "x", "candidates": ["c1", "c2"]}]
    corpus = [{"id": f"c{i}", "text": str(i)} for i in range(3)]
    task = read_task(_write(tmp_path / "m", "moment", queries, corpus, [{"query": "q", "doc": "c2"}]))
    c = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.6, 0.4]])  # c0 scores best but is not a candidate
    assert task_scores(task, torch.tensor([[1.0, 0.0]]), c, normalize=False)["score"] == 1.0


def test_classification_is_accuracy_and_evaluate_task_encodes_both_sides_with_instructions(tmp_path):
    labels = ["cat", "dog", "bird"]
    queries = [{"id": i, "text": lab} for i, lab in enumerate(["cat", "dog", "dog"])]
    corpus = [{"id": lab, "text": lab} for lab in labels]
    qrels = [{"query": 0, "doc": "cat"}, {"query": 1, "doc": "dog"}, {"query": 2, "doc": "bird"}]
    task = read_task(_write(tmp_path / "cls", "classification", queries, corpus, qrels,
                            query_instruction="Q: ", candidate_instruction="C: "))
    seen = []

    def encode(items):
        seen.extend(items[i].text for i in range(len(items)))
        return torch.stack([torch.eye(3)[labels.index(items[i].text.split(": ")[1])] for i in range(len(items))])

    out = evaluate_task(task, encode)
    assert out["score"] == pytest.approx(2 / 3) and out["queries"] == 3 and out["corpus"] == 3
    assert seen == ["Q: cat", "Q: dog", "Q: dog", "C: cat", "C: dog", "C: bird"]
    # a model that frames documents apart (GME): the corpus goes through ``encode_candidates``
    corpus_seen = []

    def encode_candidates(items):
        corpus_seen.extend(items[i].text for i in range(len(items)))
        return encode(items)

    seen.clear()
    assert evaluate_task(task, encode, encode_candidates=encode_candidates)["score"] == pytest.approx(2 / 3)
    assert corpus_seen == ["C: cat", "C: dog", "C: bird"] and seen == ["Q: cat", "Q: dog", "Q: dog", *corpus_seen]


@pytest.mark.parametrize("mutate, words", [
    (lambda f: (f / "task.json").write_text('{"kind": "ranking"}'), "kind must be one of"),
    (lambda f: (f / "qrels.jsonl").write_text('{"query": "q9", "doc": "d0"}\n'), "query 'q9'"),
    (lambda f: (f / "qrels.jsonl").write_text('{"query": "q1", "doc": "d0", "grade": -1}\n'), "grade -1"),
    (lambda f: (f / "qrels.jsonl").write_text('{"query": "q1", "doc": "d0"}\n'), "'q2' has no relevant"),
    (lambda f: (f / "corpus.jsonl").write_text('{"id": "d0"}\n{"id": "d0"}\n'), "twice"),
    (lambda f: (f / "queries.jsonl").write_text('not json\n'), "queries.jsonl:1 is not JSON"),
    (lambda f: (f / "corpus.jsonl").unlink(), "no corpus.jsonl"),
])
def test_malformed_folders_are_one_line_errors(tmp_path, mutate, words):
    folder = _docs_task(tmp_path)
    mutate(folder)
    with pytest.raises(UserError, match=words) as err:
        read_task(folder)
    assert "\n" not in str(err.value)


def test_moment_and_classification_rules(tmp_path):
    corpus = [{"id": "a", "text": "a"}, {"id": "b", "text": "b"}]
    with pytest.raises(UserError, match="candidates list"):
        read_task(_write(tmp_path / "m1", "moment", [{"id": "q", "text": "x"}], corpus, [{"query": "q", "doc": "a"}]))
    with pytest.raises(UserError, match="outside its candidates"):
        read_task(_write(tmp_path / "m2", "moment", [{"id": "q", "text": "x", "candidates": ["b"]}], corpus,
                         [{"query": "q", "doc": "a"}]))
    with pytest.raises(UserError, match="exactly one relevant"):
        read_task(_write(tmp_path / "c", "classification", [{"id": "q", "text": "x"}], corpus,
                         [{"query": "q", "doc": "a"}, {"query": "q", "doc": "b"}]))
