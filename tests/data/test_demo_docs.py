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
