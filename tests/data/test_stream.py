"""Streaming: disjoint shares per (rank, worker), equal step counts, task-homogeneous sub-batches drawn
alike on every rank, mixture weights, determinism, skipped corrupt samples, K negatives."""

import io
import logging
from collections import Counter

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from embedkit.data.batch import ChunkCollate
from embedkit.data.schema import Example, Item
from embedkit.data.shard_set import group_shards
from embedkit.data.shards import ImageBytes, encode_example, write_shard
from embedkit.data.stream import ShardStream

# source -> (shards, samples per shard); B has fewer shards than 2 ranks x 2 workers: samples are split
LAYOUT = {"A": (4, 6), "B": (1, 12), "C": (3, 5)}


def _png(colour) -> ImageBytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return ImageBytes(buf.getvalue(), "png")


def _example(src, s, i, image=None):
    return Example(query=Item(text=f"{src}-{s}-{i}"), positive=Item(text=f"pos {src}-{s}-{i}", image=image),
                   negatives=[Item(text=f"neg {src}-{s}-{i}")] if src == "A" else [], task=src)


def write_layout(root) -> list[str]:
    """The shards of ``LAYOUT`` under ``root``: ``<source>/train-NNNNNN.tar``; their paths."""
    paths = []
    for src, (n_shards, per) in LAYOUT.items():
        for s in range(n_shards):
            path = root / src / f"train-{s:06d}.tar"
            write_shard(path, [encode_example(_example(src, s, i), f"{src}{s}x{i:04d}") for i in range(per)])
            paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_layout(tmp_path_factory.mktemp("stream"))


def identity(items):
    return list(items)


def stream(shards, rank=0, world=2, bs=8, **kw):
    kw = {"shuffle_buffer": 6, "epoch_steps": 10, **kw}
    return ShardStream(shards, ChunkCollate(identity, chunk_size=4, num_negatives=0), bs, seed=3,
                       rank=rank, world_size=world, **kw)


def _texts(batches):
    return [ex.query.text for b in batches for ex in b]


def test_groups_by_subset_folder(shards):
    groups = group_shards(shards)
    assert {k: len(v) for k, v in groups.items()} == {"A": 4, "B": 1, "C": 3}


def test_two_ranks_two_workers_disjoint_equal_steps_full_batches(shards):
    seen = {}
    for rank in (0, 1):
        st = stream(shards, rank=rank, task_batch_size=4)
        per_worker = [list(st.batches(w, 2, epoch=0)) for w in (0, 1)]
        assert [len(b) for b in per_worker] == [5, 5]  # steps 0,2,4,.. and 1,3,5,..
        assert all(len(batch) == 8 for b in per_worker for batch in b)
        texts = _texts(per_worker[0] + per_worker[1])
        for w in (0, 1):  # the two workers of a rank are disjoint too
            other = set(_texts(per_worker[1 - w]))
            assert not set(_texts(per_worker[w])) & other
        seen[rank] = set(texts)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert {t.split("-")[0] for t in seen[0] | seen[1]} == {"A", "B", "C"}  # B's single shard is shared by samples


def test_dataloader_workers_interleave_steps_in_order(shards):
    st = stream(shards, rank=1, task_batch_size=4, epoch_steps=7)
    loader = DataLoader(st, batch_size=None, num_workers=2)
    assert len(loader) == 7
    got = [b.tasks for b in loader]
    assert len(got) == 7
    assert got == [st.step_sources(s) for s in range(7)]  # batch s of the loader is step s


def test_sub_batches_are_homogeneous_and_the_same_on_every_rank(shards):
    r0, r1 = stream(shards, rank=0, task_batch_size=4), stream(shards, rank=1, task_batch_size=4)
    b0, b1 = list(r0.batches(0, 1)), list(r1.batches(0, 1))
    assert len(b0) == len(b1) == 10
    for x, y in zip(b0, b1):
        tx, ty = [e.task for e in x], [e.task for e in y]
        assert tx == ty
        assert len(set(tx[:4])) == 1 and len(set(tx[4:])) == 1
    assert len({e.task for b in b0 for e in b}) == 3  # over the steps, every subset comes up


def test_fully_mixed_batches_mix_subsets(shards):
    st = stream(shards, task_batch_size=0)
    assert any(len({e.task for e in b}) > 1 for b in st.batches(0, 1))


def test_mixture_weights(shards):
    st = stream(shards, task_batch_size=1, mix={"A": 1, "B": 0, "C": 3})
    counts = Counter(t for s in range(500) for t in st.step_sources(s))
    assert "B" not in counts
    assert 0.7 < counts["C"] / sum(counts.values()) < 0.8
    default = stream(shards, task_batch_size=1)  # no manifest: weight = number of shards (4:1:3)
    assert default.weights == {"A": 4.0, "B": 1.0, "C": 3.0}
    with pytest.raises(ValueError, match="unknown subset"):
        stream(shards, mix={"Z": 1})
    with pytest.raises(ValueError, match="task_batch_size"):
        stream(shards, task_batch_size=3)


def test_deterministic_in_seed(shards):
    a = _texts(stream(shards, task_batch_size=4).batches(0, 2))
    b = _texts(stream(shards, task_batch_size=4).batches(0, 2))
    st = stream(shards, task_batch_size=4)
    st.seed = 4
    c = _texts(st.batches(0, 2))
    assert a == b and a != c
    assert _texts(stream(shards).batches(0, 1, epoch=1)) != _texts(stream(shards).batches(0, 1, epoch=0))


def test_corrupt_image_and_truncated_tar_are_skipped_and_batches_stay_full(tmp_path, caplog):
    good = [encode_example(_example("D", 0, i, image=_png((i, 0, 0))), f"D0x{i:04d}") for i in range(6)]
    bad = encode_example(_example("D", 0, 99, image=_png((9, 9, 9))), "D0x0099")
    bad["D0x0099.p.png"] = b"not a png at all"
    write_shard(tmp_path / "D" / "train-000000.tar", good[:3] + [bad] + good[3:])
    write_shard(tmp_path / "D" / "train-000001.tar", [encode_example(_example("D", 1, i, image=_png((0, i, 0))),
                                                                    f"D1x{i:04d}") for i in range(6)])
    trunc = tmp_path / "D" / "train-000001.tar"
    trunc.write_bytes(trunc.read_bytes()[: 2 * 2048 + 300])  # 2 samples (2 members each), then a cut header
    st = ShardStream([str(p) for p in sorted((tmp_path / "D").glob("*.tar"))],
                     ChunkCollate(identity, 4, 0), 4, seed=0, shuffle_buffer=2, epoch_steps=8)
    with caplog.at_level(logging.WARNING, logger="embedkit.data.stream"):
        batches = list(st)
    assert len(batches) == 8 and all(b.per_device_batch == 4 and len(b.tasks) == 4 for b in batches)
    assert st.skipped > 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("D0x0099" in m for m in warned) == 1  # met again on every pass, warned once
    assert sum("truncated" in m and "train-000001" in m for m in warned) == 1
    assert st.skipped > len(warned)  # every meeting is counted
    texts = {ex.text for b in batches for ex in b.query_chunks[0] + b.query_chunks[-1]}
    assert "D-0-99" not in texts


def test_negatives_padded_to_exactly_k():
    with_neg = Example(Item("q0"), Item("p0"), [Item("n0a"), Item("n0b")], "t")
    without = Example(Item("q1"), Item("p1"), [], "t")
    third = Example(Item("q2"), Item("p2"), [], "t")
    batch = ChunkCollate(identity, chunk_size=100, num_negatives=3)([with_neg, without, third])
    cands = [it.text for it in batch.candidate_chunks[0]]
    assert cands[:3] == ["p0", "p1", "p2"]
    assert cands[3:6] == ["n0a", "n0b", "n0a"]  # own negatives, cycled
    assert len(cands) == 3 + 3 * 3
    assert "p1" not in cands[6:9] and set(cands[6:9]) <= {"p0", "p2"}  # borrowed from the others only
    assert "p2" not in cands[9:12]
    with pytest.raises(ValueError, match="num_negatives"):
        ChunkCollate(identity, 4, 2)([without])


def test_iter_samples_raises_on_any_cut_and_never_yields_a_partial_sample(tmp_path):
    import tarfile

    from embedkit.data.shards import decode_sample, iter_samples

    path = tmp_path / "t.tar"
    write_shard(path, [encode_example(_example("E", 0, i, image=_png((0, 0, i))), f"E{i}") for i in range(4)])
    data = path.read_bytes()
    assert len(list(iter_samples(path))) == 4
    for cut in range(0, 4 * 2048, 300):  # every cut before the last sample's end
        path.write_bytes(data[:cut])
        got = []
        with pytest.raises(tarfile.ReadError):
            for key, files in iter_samples(path):
                got.append(decode_sample(key, files))  # every yielded sample is complete
        assert len(got) <= cut // 2048


def test_fixed_epoch_length_and_the_next_epoch_continues_the_steps(shards):
    st = stream(shards, rank=0, task_batch_size=2, epoch_steps=5)
    loader = DataLoader(st, batch_size=None, num_workers=2, persistent_workers=True)
    first, second = [b.tasks for b in loader], [b.tasks for b in loader]
    assert len(first) == len(second) == 5
    assert first == [st.step_sources(s) for s in range(5)]
    assert second == [st.step_sources(s) for s in range(5, 10)]  # steps go on: epoch 2 is not epoch 1 again
