"""Resuming a stream: starting at step S yields exactly what the uninterrupted stream yields from S
on (every rank, worker and mixture mode; two-modality grouping in tests/data/test_stream_grouping.py),
and costs the same at step 10,000 as at step 10."""

import itertools
import time

import pytest

from embedkit.data.batch import ChunkCollate
from embedkit.data.shards import encode_example, write_shard
from embedkit.data.stream import ShardStream
from tests.data.test_stream import _example, _png, identity, write_layout


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_layout(tmp_path_factory.mktemp("stream-resume"))


def make(shards, rank=0, world=2, **kw):
    kw = {"shuffle_buffer": 6, **kw}
    return ShardStream(shards, ChunkCollate(identity, chunk_size=8, num_negatives=0), 8, seed=3,
                       rank=rank, world_size=world, **kw)


def texts(batches):
    return [[ex.text for ex in b.query_chunks[0]] if hasattr(b, "query_chunks") else [ex.query.text for ex in b]
            for b in batches]


@pytest.mark.parametrize("mode", [{"task_batch_size": 4}, {"task_batch_size": 0},
                                  {"group_by": "modality", "length_order": "balanced", "accumulate": 4}])
@pytest.mark.parametrize("rank,worker,start", [(0, 0, 1), (1, 1, 7), (0, 1, 40)])
def test_starting_at_a_step_is_the_uninterrupted_stream_from_there(shards, mode, rank, worker, start):
    full = texts(itertools.islice(make(shards, rank, **mode).batches(worker, 2), 30))
    # worker w builds the steps w, w+2, ...: the ones >= start
    mine = [s for s in range(worker, 60, 2)][:30]
    expected = [b for s, b in zip(mine, full) if s >= start]
    resumed = texts(itertools.islice(make(shards, rank, **mode).batches(worker, 2, start=start), len(expected)))
    assert resumed == expected


def test_start_step_applies_to_the_first_iteration_only(shards):
    st = make(shards, world=1, task_batch_size=4, epoch_steps=6, start_step=4)
    first, second = texts(iter(st)), texts(iter(st))
    whole = make(shards, world=1, task_batch_size=4, epoch_steps=6)
    e0, e1 = texts(iter(whole)), texts(iter(whole))
    assert first == e0[4:] and second == e1


@pytest.mark.parametrize("start,epoch_steps", [(7, 0), (5, 7), (10, 7)])
def test_a_resumed_loader_with_two_workers_yields_the_uninterrupted_batches_in_order(shards, start, epoch_steps):
    """The loader asks its workers in turn, worker 0 first: after an odd start the worker that built
    step ``start`` must answer first (else steps come swapped: start+1, start, ...)."""
    from torch.utils.data import DataLoader

    def loader(**kw):
        return DataLoader(make(shards, world=1, task_batch_size=4, epoch_steps=epoch_steps, **kw), batch_size=None,
                          num_workers=2, persistent_workers=True)

    whole, resumed = loader(), loader(start_step=start)
    if epoch_steps:  # the resumed epoch's rest, then the next epoch whole
        flat = [b for _ in range(3) for b in texts(iter(whole))]
        expected = flat[start:(start // epoch_steps + 2) * epoch_steps]
        got = texts(iter(resumed)) + texts(iter(resumed))
    else:
        expected = texts(itertools.islice(iter(whole), 12))[start:]
        got = texts(itertools.islice(iter(resumed), len(expected)))
    assert got == expected


def _first_batch_seconds(shards, starts: tuple[int, ...], repeats: int = 5) -> list[float]:
    """Best time to the first batch at each start step; the starts are measured interleaved, so a
    busy machine (another test worker, another process) slows all of them alike."""
    best = [float("inf")] * len(starts)
    for _ in range(repeats):
        for k, start in enumerate(starts):
            st = make(shards, task_batch_size=4, start_step=start, shuffle_buffer=64)
            t = time.perf_counter()
            next(iter(st))
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def test_time_to_first_batch_at_step_10000_is_within_2x_of_step_10(tmp_path):
    # 40 shards x 50 samples with images: filling the first window (decoding 8 samples) is the real cost
    paths = []
    for src in ("A", "B"):
        for s in range(20):
            path = tmp_path / src / f"train-{s:06d}.tar"
            write_shard(path, [encode_example(_example(src, s, i, image=_png((i, s, 9))), f"{src}{s}x{i:04d}")
                               for i in range(50)])
            paths.append(str(path))
    near, far = _first_batch_seconds(paths, (10, 10_000))
    assert far <= 2 * near, f"first batch at step 10: {near * 1e3:.1f} ms, at step 10,000: {far * 1e3:.1f} ms"
