"""B3 batch mining (data/b3.py and the stream's hook): on a planted structure (clusters of near-duplicate
items) the batches are drawn within communities; the same seed gives the same batches; a resumed stream
draws exactly the batches of the uninterrupted one; the compositions (one subset per batch, length
order) and the misuses."""

import itertools

import numpy as np
import pytest

from embedkit.data.b3 import (
    B3Partition,
    B3Plan,
    B3Settings,
    ExampleIndex,
    build_partition,
    mean_intra_batch_similarity,
    partition_fingerprint,
)
from embedkit.data.batch import ChunkCollate
from embedkit.data.schema import Example, Item
from embedkit.data.shard_set import ShardSet
from embedkit.data.shards import encode_example, write_shard
from embedkit.data.stream import ShardStream
from tests.data.test_stream import identity

CLUSTERS, PER, DIM = 8, 16, 32  # planted: 8 clusters of 16 near-duplicates in each of 2 subsets


def planted(seed=0):
    """(teacher query and positive embeddings [N, D], the planted cluster of each example, its source):
    per subset, CLUSTERS centres, each example its centre plus a little noise; the clusters are dealt
    in a shuffled order, so reading the shards in order is not reading by cluster."""
    rng = np.random.default_rng(seed)
    one = np.repeat(np.arange(CLUSTERS), PER)
    labels = np.concatenate([rng.permutation(one), CLUSTERS + rng.permutation(one)])
    centres = rng.normal(size=(2 * CLUSTERS, DIM))
    q = centres[labels] + 0.05 * rng.normal(size=(len(labels), DIM))
    t = centres[labels] + 0.05 * rng.normal(size=(len(labels), DIM))
    return q, t, labels, np.repeat([0, 1], CLUSTERS * PER)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two subsets (folders A, B) of two shards each; example i's query text names its planted cluster."""
    root = tmp_path_factory.mktemp("b3")
    _, _, labels, _ = planted()
    paths = []
    for s, name in enumerate("AB"):
        rows = [s * CLUSTERS * PER + int(k) for k in range(CLUSTERS * PER)]
        for part in range(2):
            chunk = rows[part * 64:(part + 1) * 64]
            path = root / name / f"train-{part:06d}.tar"
            write_shard(path, [encode_example(_example(labels[i], i), f"{name}{part}x{i:05d}") for i in chunk])
            paths.append(str(path))
    return paths, labels


def _example(cluster, i) -> Example:
    return Example(query=Item(text=f"c{cluster}-{i}"), positive=Item(text=f"pos {i}"), negatives=[], task="t")


@pytest.fixture(scope="module")
def partition():
    q, t, _, source = planted()
    return build_partition(q, t, source, B3Settings(window=(1, 8), cluster_size=8), seed=0, log=lambda _: None)


def make(paths, partition, rank=0, world=1, bs=8, **kw):
    return ShardStream(paths, ChunkCollate(identity, chunk_size=8, num_negatives=0), bs, seed=3, rank=rank,
                       world_size=world, b3=partition, **kw)


def texts(batches):
    """Query texts of each batch (examples, or a collated ``TrainBatch``'s first query chunk)."""
    return [[ex.text for ex in b.query_chunks[0]] if hasattr(b, "query_chunks") else [ex.query.text for ex in b]
            for b in batches]


def cluster_of(text: str) -> int:
    return int(text.split("-")[0][1:])


def test_the_index_reads_every_example_in_shard_order(shards):
    paths, _ = shards
    index = ExampleIndex(ShardSet(paths))
    assert len(index) == 2 * CLUSTERS * PER
    key, files = index.read(70)
    assert key == "A1x00070" and f'"c{shards[1][70]}-70"'.encode() in files[f"{key}.json"]
    assert index.source_of()[127] == 0 and index.source_of()[128] == 1


def test_planted_clusters_come_out_as_single_cluster_batches(shards, partition):
    """Mean intra-batch teacher similarity >= 2x random batches (research note F4's bar), and nearly every
    batch holds one planted cluster only."""
    q, t, labels, _ = planted()
    plan = B3Plan(partition, seed=3, global_batch=8)
    batches = [plan.global_indices(s) for s in range(plan.steps_per_epoch)]
    assert plan.steps_per_epoch == 2 * CLUSTERS * PER // 8
    single = sum(len(set(labels[b])) == 1 for b in batches)
    assert single >= 0.9 * len(batches)
    perm = np.random.default_rng(0).permutation(len(labels))
    random = [perm[k:k + 8] for k in range(0, len(perm), 8)]
    assert mean_intra_batch_similarity(batches, t) >= 2 * mean_intra_batch_similarity(random, t)
    # every example once per epoch
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(labels)))


def test_the_stream_draws_the_plans_batches(shards, partition):
    paths, _ = shards
    got = texts(itertools.islice(make(paths, partition).batches(), 32))
    assert sum(len({cluster_of(x) for x in b}) == 1 for b in got) >= 29
    assert len({x for b in got for x in b}) == 256  # one epoch: each example once


def test_same_seed_same_batches_another_seed_other_batches(shards, partition):
    paths, _ = shards
    a = texts(itertools.islice(make(paths, partition).batches(), 40))
    b = texts(itertools.islice(make(paths, partition).batches(), 40))
    other = ShardStream(paths, ChunkCollate(identity, chunk_size=8, num_negatives=0), 8, seed=4, b3=partition)
    assert a == b and a != texts(itertools.islice(other.batches(), 40))
    q, t, _, source = planted()
    again = build_partition(q, t, source, B3Settings(window=(1, 8), cluster_size=8), seed=0, log=lambda _: None)
    assert again.clusters == partition.clusters


@pytest.mark.parametrize("rank,worker,start", [(0, 0, 1), (1, 1, 7), (0, 1, 45)])
def test_a_resumed_stream_draws_the_uninterrupted_batches(shards, partition, rank, worker, start):
    paths, _ = shards
    full = texts(itertools.islice(make(paths, partition, rank, world=2, bs=4).batches(worker, 2), 40))
    mine = list(range(worker, 80, 2))[:40]
    expected = [b for s, b in zip(mine, full) if s >= start]
    resumed = make(paths, partition, rank, world=2, bs=4).batches(worker, 2, start=start)
    assert texts(itertools.islice(resumed, len(expected))) == expected


def test_a_resumed_loader_with_two_workers_yields_the_uninterrupted_batches(shards, partition):
    from torch.utils.data import DataLoader

    paths, _ = shards

    def loader(**kw):
        return DataLoader(make(paths, partition, epoch_steps=10, **kw), batch_size=None, num_workers=2)

    whole = texts(iter(loader()))
    assert len(whole) == 10 and texts(iter(loader(start_step=3))) == whole[3:]


def test_ranks_share_one_global_batch(shards, partition):
    paths, _ = shards
    r0 = texts(itertools.islice(make(paths, partition, 0, world=2, bs=4).batches(), 5))
    r1 = texts(itertools.islice(make(paths, partition, 1, world=2, bs=4).batches(), 5))
    whole = texts(itertools.islice(make(paths, partition, bs=8).batches(), 5))
    assert [a + b for a, b in zip(r0, r1)] == whole


def test_one_subset_per_batch_with_task_batch_size(shards):
    """B3 at a batch that cuts across subsets: mixed by default; task_batch_size > 0: each batch one subset."""
    paths, _ = shards
    q, t, _, source = planted()
    part = build_partition(q, t, source, B3Settings(window=(1, 8), cluster_size=8), seed=0, log=lambda _: None)
    part.clusters = [c[:5] for c in part.clusters]  # clusters of 5 in batches of 8: batches straddle clusters
    mixed = texts(itertools.islice(make(paths, part).batches(), 20))
    one = texts(itertools.islice(make(paths, part, task_batch_size=8).batches(), 20))
    subset = lambda b: {cluster_of(x) // CLUSTERS for x in b}  # noqa: E731
    assert all(len(subset(b)) == 1 for b in one)
    assert any(len(subset(b)) == 2 for b in mixed)


def test_length_order_redeals_within_the_optimizer_step(shards, partition):
    paths, _ = shards
    plain = texts(itertools.islice(make(paths, partition, accumulate=2).batches(), 8))
    ordered = texts(itertools.islice(make(paths, partition, accumulate=2, length_order="sorted").batches(), 8))
    for k in range(0, 8, 2):
        assert sorted(plain[k] + plain[k + 1]) == sorted(ordered[k] + ordered[k + 1])


def test_an_unreadable_sample_is_replaced_from_its_cluster(tmp_path, partition, shards):
    """A sample that fails to decode is skipped and counted; its cluster's next member takes its place."""
    paths, _ = shards
    st = make(paths, partition)
    first = st.b3.step_indices(0)
    bad = first[0]
    real = st.index.read

    def read(i):
        key, files = real(i)
        return (key, {f"{key}.json": b"{broken"}) if i == bad else (key, files)

    st.index.read = read
    batch = next(st.batches())
    assert st.skipped == 1 and len(batch) == 8
    assert len({cluster_of(ex.query.text) for ex in batch}) == 1


def test_misuses_are_one_line_errors(shards, partition):
    paths, _ = shards
    with pytest.raises(ValueError, match="data.train.mix"):
        make(paths, partition, mix={"A": 1.0})
    with pytest.raises(ValueError, match="group_by"):
        make(paths, partition, group_by="modality")
    wrong = B3Partition(partition.clusters, partition.sources, partition.n + 1)
    with pytest.raises(ValueError, match="made for 257 examples"):
        make(paths, wrong)
    with pytest.raises(ValueError, match="window"):
        B3Settings(window=(0, 4))


def test_the_cache_key_names_teacher_data_settings_and_seed():
    base = partition_fingerprint("T", "D", B3Settings(), 0)
    assert len({base, partition_fingerprint("T2", "D", B3Settings(), 0), partition_fingerprint("T", "D2", B3Settings(), 0),
                partition_fingerprint("T", "D", B3Settings(window=(1, 9)), 0),
                partition_fingerprint("T", "D", B3Settings(), 1)}) == 5
    assert partition_fingerprint("T", "D", B3Settings(block=7), 0) == base  # block does not change the result


def test_the_partition_file_round_trips(tmp_path, partition):
    partition.save(tmp_path / "p.json")
    back = B3Partition.load(tmp_path / "p.json")
    assert back.clusters == partition.clusters and back.sources == partition.sources and back.n == partition.n
