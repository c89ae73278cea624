"""Document-page demo: deterministic pages, queries naming their regions, graded qrels by the rule."""

import random

import numpy as np
import pytest
import torch

from embedkit.data import demo_docs as dd
from embedkit.data.demo import COLOURS
from embedkit.errors import UserError
from embedkit.eval.ranking import ndcg_at_k

SPEC = dd.PageSpec("red", "triangle", "above", 3)


def _rows_of(img, colour):
    mask = (np.abs(np.asarray(img, dtype=np.int16) - np.array(COLOURS[colour])) <= 30).all(axis=-1)
    return np.nonzero(mask)[0]


def test_draw_page_deterministic_sizes_modes():
    a, b = dd.draw_page(SPEC, random.Random(5), 96), dd.draw_page(SPEC, random.Random(5), 96)
    assert a.tobytes() == b.tobytes()
    assert dd.draw_page(SPEC, random.Random(6), 96).tobytes() != a.tobytes()
    for size, want in [(64, (64, 64)), (128, (128, 128)), ((80, 112), (80, 112))]:
        img = dd.draw_page(SPEC, random.Random(0), size)
        assert img.size == want and img.mode == "RGB"


def test_the_shape_is_where_the_spec_says():
    for place in dd.PLACES:
        for seed in range(3):
            img = dd.draw_page(dd.PageSpec("blue", "square", place, 2), random.Random(seed), 96)
            rows = _rows_of(img, "blue")
            assert len(rows) > 20
            assert (rows.mean() < 48) == (place == "above"), (place, rows.mean())


@pytest.mark.parametrize("columns", dd.COLUMNS)
def test_the_table_has_the_named_columns(columns):
    for place in dd.PLACES:
        img = np.asarray(dd.draw_page(dd.PageSpec("green", "circle", place, columns), random.Random(1), 96))
        top, bottom = (60, 86) if place == "above" else (28, 54)  # inside the table's band
        ink = (np.abs(img[top:bottom].astype(np.int16) - np.array(dd.INK)) <= 10).all(axis=-1)
        full = np.nonzero(ink.mean(axis=0) > 0.9)[0]  # x of the vertical lines (borders included)
        runs = 1 + int((np.diff(full) > 1).sum()) if len(full) else 0
        assert runs == columns + 1, (place, full)


def test_page_queries_name_the_spec():
    assert dd.page_queries(SPEC) == ["a page with a red triangle above a table of 3 columns",
                                     "a page with a table of 3 columns below a red triangle"]
    texts = [q for s in dd.all_specs() for q in dd.page_queries(s)]
    assert len(set(texts)) == len(texts) == 2 * 180


def test_corpus_deterministic_and_pages_differ():
    a, b = dd.build_corpus(30, 10, seed=1, size=64), dd.build_corpus(30, 10, seed=1, size=64)
    assert [p.tobytes() for p in a.pages] == [p.tobytes() for p in b.pages] and a.qrels == b.qrels
    assert len({p.tobytes() for p in a.pages}) == 30 and len(set(a.specs)) == 30
    assert all(p.size == (64, 64) for p in a.pages)
    c = dd.build_corpus(30, 10, seed=2, size=64)
    assert c.specs != a.specs


def test_qrels_follow_the_grading_rule():
    corpus = dd.build_corpus(120, 40, seed=0, size=64)
    assert list(corpus.qrels) == corpus.queries and len(set(corpus.queries)) == 40
    seen_grade1 = 0
    for q, src in zip(corpus.queries, corpus.query_pages):
        rel = corpus.qrels[q]
        qspec = corpus.specs[src]
        assert q in dd.page_queries(qspec)
        assert rel[src] == 2 and [i for i, g in rel.items() if g == 2] == [src]
        for i, s in enumerate(corpus.specs):
            shares = s.object_part() == qspec.object_part() or s.table_part() == qspec.table_part()
            want = 2 if i == src else (1 if shares else 0)
            assert rel.get(i, 0) == want, (q, s)
        seen_grade1 += sum(g == 1 for g in rel.values())
    assert seen_grade1 > 0


def test_qrels_feed_ndcg():
    corpus = dd.build_corpus(20, 5, seed=0, size=64)
    qrels = list(corpus.qrels.values())
    perfect = torch.tensor([[float(r.get(i, 0)) for i in range(20)] for r in qrels])
    assert ndcg_at_k(perfect, qrels, k=5) == pytest.approx(1.0)
    assert ndcg_at_k(-perfect, qrels, k=5) < 0.5


@pytest.mark.parametrize("call,msg", [
    (lambda: dd.build_corpus(181, 1), "num_pages=181"),
    (lambda: dd.build_corpus(10, 11), "num_queries=11"),
    (lambda: dd.draw_page(SPEC, random.Random(0), 16), "page size"),
])
def test_bad_input_is_one_line_error(call, msg):
    with pytest.raises(UserError, match=msg) as e:
        call()
    assert "\n" not in str(e.value)


# -- the docs demo's examples, held-out corpus and shards (data/demo_visual.py, datamodule.HeldOut) ------
DOCS = {"enabled": True, "kind": "docs", "scenes": "single", "train_size": 6, "val_size": 12, "image_size": 56,
        "holdout_combinations": 5, "seed": 3, "cache_dir": None, "text_only": False, "num_frames": 4,
        "first_frame_only": False}


def test_docs_training_never_draws_a_held_out_spec():
    from embedkit.data import demo_visual

    train, held = demo_visual.split_specs(5, 3)
    assert len(held) == 5 and not set(train) & set(held) and len(train) + 5 == len(dd.all_specs())
    assert demo_visual.split_specs(5, 3) == (train, held)
    queries = {q for s in held for q in dd.page_queries(s)}
    seen = [ex.query.text for ex in demo_visual.docs_train_examples({**DOCS, "train_size": 300}, 0, 300)]
    assert len(seen) == 300 and not set(seen) & queries
    assert all(ex.task == "demo_docs" and ex.positive.image.size == (56, 56) for ex in
               demo_visual.docs_train_examples(DOCS, 0, 3))


def test_docs_held_out_corpus_carries_ids_and_graded_qrels():
    from embedkit.data import demo_visual

    val = demo_visual.docs_val_examples(DOCS)
    _, held = demo_visual.split_specs(5, 3)
    ids = [extra["doc_id"] for _, extra in val]
    assert len(val) == 12 and len(set(ids)) == 12
    specs = [next(s for s in dd.all_specs() if ex.query.text in dd.page_queries(s)) for ex, _ in val]
    assert len(set(specs)) == 12 and set(held) <= set(specs)  # distinct pages, every held-out spec in
    for (_, extra), spec in zip(val, specs):
        want = {ids[k]: dd.grade(spec, s) for k, s in enumerate(specs) if dd.grade(spec, s) > 0}
        assert extra["qrels"] == want and want[extra["doc_id"]] == 2
    assert [e["qrels"] for _, e in demo_visual.docs_val_examples(DOCS)] == [e["qrels"] for _, e in val]


def test_docs_shards_round_trip_to_the_held_out_qrels(tmp_path):
    from embedkit.data import demo_visual
    from embedkit.data.datamodule import HeldOut, read_samples

    p = {**DOCS, "cache_dir": str(tmp_path)}
    root = demo_visual.ensure_shards(p, log=lambda m: None)
    assert root.parent.name == "demo_docs" and (root / "demo_docs" / "train-000000.tar").is_file()
    assert demo_visual.ensure_shards(p, log=lambda m: 1 / 0) == root  # cached: nothing drawn again
    samples = read_samples([str(root / "val-000000.tar")], 100)
    held = HeldOut.of(samples)
    val = demo_visual.docs_val_examples(p)
    assert held.metric == "ndcg@5" and len(held.qrels) == 12
    index = {extra["doc_id"]: i for i, (_, extra) in enumerate(val)}
    assert held.qrels == [{index[d]: g for d, g in extra["qrels"].items()} for _, extra in val]
    # the qrels score a perfect ranking 1 and the untrained-like identity of scores by the tie rule below 1
    perfect = torch.tensor([[float(r.get(i, 0)) for i in range(12)] for r in held.qrels])
    assert ndcg_at_k(perfect, held.qrels, k=5) == pytest.approx(1.0)


def test_held_out_cut_keeps_only_read_candidates():
    from embedkit.data.datamodule import HeldOut
    from embedkit.data.schema import Example, Item

    ex = Example(query=Item(text="q"), positive=Item(text="p"))
    samples = [(ex, {"doc_id": "a", "qrels": {"a": 2, "z": 1}}), (ex, {"doc_id": "b", "qrels": {"b": 2, "a": 1}})]
    assert HeldOut.of(samples).qrels == [{0: 2}, {1: 2, 0: 1}]
    assert HeldOut.of([(ex, {})]).metric == "p@1" and HeldOut.of([]).qrels is None


class _Trainer:
    def __init__(self, held):
        self.datamodule = type("DM", (), {"held_out": held})()


def test_module_scores_a_graded_held_out_set_with_its_metric():
    from functools import partial

    from embedkit.data.datamodule import HeldOut
    from embedkit.training.module import EmbeddingModule

    qrels = [{0: 2, 2: 1}, {1: 2}, {2: 2, 0: 1}]
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1], [0.7, 0.0, 0.6]])  # query 2 ranks its page second
    import lightning as L

    module = EmbeddingModule.__new__(EmbeddingModule)  # the metric needs no encoder nor loss
    L.LightningModule.__init__(module)
    module._trainer = _Trainer(HeldOut("ndcg@5", qrels))
    module.graded_metric = None
    with pytest.raises(UserError, match="graded qrels"):
        module.held_out_metric(scores)
    module.graded_metric = partial(ndcg_at_k, k=5)
    name, value = module.held_out_metric(scores)
    assert name == "ndcg@5" and value == pytest.approx(ndcg_at_k(scores, qrels, k=5)) and value < 1
    module._trainer = _Trainer(HeldOut())
    assert module.held_out_metric(scores) == ("p@1", pytest.approx(2 / 3))
