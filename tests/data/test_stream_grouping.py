"""Modality-grouped optimizer steps and length-ordered micro-batches (LLaVE's
--group_by_modality_length): one query modality per optimizer step on every rank and worker, drawn
by the weights of each modality's subsets; examples re-dealt by length within the micro-batches a
worker builds of one step; everything a pure function of the step, so a resume needs no replay."""

import itertools
import json
import shutil
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from embedkit.data.batch import ChunkCollate
from embedkit.data.mixture import arrange_by_length, example_length
from embedkit.data.schema import Example, Item
from embedkit.data.shard_set import ShardSet
from embedkit.data.shards import encode_example, write_shard
from embedkit.data.stream import ShardStream
from tests.data.test_stream import _png, identity

# source -> (shards, samples per shard, which samples have an image query)
MODAL = {
    "I1": (2, 6, lambda i: True),
    "I2": (1, 10, lambda i: True),
    "T1": (3, 5, lambda i: False),
    "M": (2, 6, lambda i: i % 3 == 0),  # a third image queries: counts as text
}
KINDS = {"I1": "image", "I2": "image", "T1": "text", "M": "text"}


def _modal_example(src, s, i, image_query):
    words = " ".join(f"{src}{s}w{k}" for k in range(1 + (7 * i + 3 * s) % 9))  # 1..9 words
    query = Item(text=f"{src}-{s}-{i} {words}", image=_png((i, s, 5)) if image_query else None)
    return Example(query=query, positive=Item(text=f"pos {src}-{s}-{i}"), negatives=[], task=src)


def write_modal_shards(root):
    paths = []
    for src, (n_shards, per, has_image) in MODAL.items():
        for s in range(n_shards):
            path = root / src / f"train-{s:06d}.tar"
            write_shard(path, [encode_example(_modal_example(src, s, i, has_image(i)), f"{src}{s}x{i:04d}")
                               for i in range(per)])
            paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def modal(tmp_path_factory):
    return write_modal_shards(tmp_path_factory.mktemp("modal"))


def make(shards, rank=0, world=2, bs=4, accumulate=4, **kw):
    kw = {"shuffle_buffer": 6, "group_by": "modality", **kw}
    return ShardStream(shards, ChunkCollate(identity, chunk_size=4, num_negatives=0), bs, seed=5,
                       rank=rank, world_size=world, accumulate=accumulate, **kw)


def _steps(worker, workers, n):
    return list(range(worker, n, workers))


def test_a_source_counts_by_the_majority_of_its_queries_or_its_manifest(modal, tmp_path):
    assert make(modal).modality == KINDS
    copy = tmp_path / "copy"
    shutil.copytree(sorted({p.rsplit("/", 2)[0] for p in modal})[0], copy)
    (copy / "manifest.json").write_text(json.dumps({"subsets": {"M": {"count": 12, "query_modality": "image"}}}))
    shards = sorted(str(p) for p in copy.glob("*/*.tar"))
    assert ShardSet([s for s in shards if "/M/" in s]).query_modality("M") == "image"
    assert make(shards).modality == {**KINDS, "M": "image"}


@pytest.mark.parametrize("mode", [{"task_batch_size": 0}, {"task_batch_size": 2},
                                  {"length_order": "sorted"}, {"length_order": "balanced"}])
def test_every_optimizer_step_is_single_modality_on_every_rank_and_worker(modal, mode):
    a, n = 4, 24
    by_step = {}
    for rank in (0, 1):
        st = make(modal, rank=rank, epoch_steps=n, **mode)
        for w in (0, 1):
            for s, batch in zip(_steps(w, 2, n), st.batches(w, 2, epoch=0)):
                by_step.setdefault(s, []).extend(batch)
    assert sorted(by_step) == list(range(n))
    kinds = []
    for o in range(n // a):
        examples = [e for s in range(o * a, o * a + a) for e in by_step[s]]
        assert len(examples) == a * 2 * 4
        (kind,) = {KINDS[e.task] for e in examples}
        for e in examples:
            if e.task != "M":  # M's image minority rides along with its text majority
                assert (e.query.image is not None) == (kind == "image")
        assert kind == st.step_modality(o * a)
        kinds.append(kind)
    assert set(kinds) == {"image", "text"}


def test_dataloader_workers_keep_steps_single_modality(modal):
    st = make(modal, rank=1, epoch_steps=12, length_order="balanced")
    got = [b.tasks for b in DataLoader(st, batch_size=None, num_workers=2)]
    assert len(got) == 12
    for o in range(3):
        assert len({KINDS[t] for tasks in got[4 * o:4 * o + 4] for t in tasks}) == 1


def test_modality_frequency_follows_the_weights_and_sources_within_it(modal):
    st = make(modal, task_batch_size=1)  # default weights: shard counts, image 2+1 : text 3+2
    a, steps = st.accumulate, range(0, 4 * 3000, 4)
    image = sum(st.step_modality(s) == "image" for s in steps) / len(steps)
    assert abs(image - 3 / 8) < 0.03
    st = make(modal, task_batch_size=1, mix={"I1": 1, "I2": 3, "T1": 12, "M": 0})
    counts = Counter(t for s in range(4000) for t in st.step_sources(s))
    assert "M" not in counts
    total = sum(counts.values())
    assert abs((counts["I1"] + counts["I2"]) / total - 0.25) < 0.04
    assert abs(counts["I2"] / (counts["I1"] + counts["I2"]) - 0.75) < 0.04
    for s in range(0, 400, 7):  # each step's draws stay in its optimizer step's modality
        assert {KINDS[t] for t in st.step_sources(s)} == {st.step_modality(s - s % a)}


def test_one_modality_only_is_the_plain_mixture(modal):
    texts = [p for p in modal if "/T1/" in p or "/M/" in p]
    grouped, plain = make(texts, task_batch_size=2), make(texts, task_batch_size=2, group_by="none")
    assert [grouped.step_sources(s) for s in range(50)] == [plain.step_sources(s) for s in range(50)]


def _chunks(stream):
    return [[item.text for item in b.query_chunks[0]] for b in stream]


def _q(batches):
    return [[e.query.text for e in b] for b in batches]


@pytest.mark.parametrize("order", ["sorted", "balanced"])
@pytest.mark.parametrize("workers", [1, 2])
def test_length_order_re_deals_a_workers_micro_batches_of_one_step(modal, order, workers):
    a, n = 4, 16
    plain = make(modal, world=1, epoch_steps=n)
    ordered = make(modal, world=1, epoch_steps=n, length_order=order)
    for w in range(workers):
        mine = _steps(w, workers, n)
        p, o = list(plain.batches(w, workers)), list(ordered.batches(w, workers))
        assert len(p) == len(o) == len(mine)
        for g in range(n // a):
            idx = [k for k, s in enumerate(mine) if s // a == g]
            group_p, group_o = [p[k] for k in idx], [o[k] for k in idx]
            assert sorted(t for b in _q(group_o) for t in b) == sorted(t for b in _q(group_p) for t in b)
            assert all(len(b) == 4 for b in group_o)
            lengths = [[example_length(e) for e in b] for b in group_o]
            if order == "sorted":  # longest first, consecutive micro-batches
                flat = [x for b in lengths for x in b]
                assert flat == sorted(flat, reverse=True)
            else:  # the greedy bound: totals differ by at most the longest example
                totals = [sum(b) for b in lengths]
                assert max(totals) - min(totals) <= max(max(b) for b in lengths)


def test_balanced_is_llave_greedy_and_sorted_is_consecutive():
    ex = [Example(Item(" ".join("w" * n)), Item(""), [], "t") for n in (9, 8, 7, 6, 5, 4, 3, 2)]
    batches = [ex[:4], ex[4:]]
    assert [[example_length(e) for e in b] for b in arrange_by_length(batches, "sorted")] == [[9, 8, 7, 6],
                                                                                                [5, 4, 3, 2]]
    # longest first, each to the lighter batch not full: 9|8, 7 -> 8, 6 -> 9, 5 -> the first of 15|15, ...
    assert [[example_length(e) for e in b] for b in arrange_by_length(batches, "balanced")] == [[9, 6, 5, 2],
                                                                                                  [8, 7, 4, 3]]


def test_length_order_with_task_runs_and_unknown_values_are_refused(modal):
    with pytest.raises(ValueError, match="task_batch_size"):
        make(modal, task_batch_size=2, length_order="sorted")
    with pytest.raises(ValueError, match="group_by"):
        make(modal, group_by="subset")
    with pytest.raises(ValueError, match="length_order"):
        make(modal, length_order="random")


@pytest.mark.parametrize("mode", [{}, {"length_order": "sorted"}, {"length_order": "balanced"},
                                  {"task_batch_size": 2}])
@pytest.mark.parametrize("rank,worker,start", [(0, 0, 4), (1, 1, 7), (0, 1, 13), (1, 0, 42)])
def test_starting_at_a_step_is_the_uninterrupted_stream_from_there(modal, mode, rank, worker, start):
    full = _q(itertools.islice(make(modal, rank, **mode).batches(worker, 2), 30))
    expected = [b for s, b in zip(_steps(worker, 2, 60), full) if s >= start]
    resumed = _q(itertools.islice(make(modal, rank, **mode).batches(worker, 2, start=start), len(expected)))
    assert resumed == expected


def test_a_resumed_epoch_inside_an_optimizer_step(modal):
    whole = make(modal, world=1, epoch_steps=10, length_order="balanced")
    e0, e1 = _chunks(whole), _chunks(whole)
    st = make(modal, world=1, epoch_steps=10, length_order="balanced", start_step=6)
    first, second = _chunks(st), _chunks(st)
    assert first == e0[6:] and second == e1
