"""Shards over HTTP (a server on 127.0.0.1 started and stopped here), ``pipe:`` commands, brace
expansion and prefix listing; a connection dropped mid-shard is resumed (Range) or re-read and
skipped (no Range) so the stream equals the one over the local copies, each sample once."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from embedkit.data import remote
from embedkit.data.batch import ChunkCollate
from embedkit.data.datamodule import checked_shards
from embedkit.data.schema import Example, Item
from embedkit.data.shards import ImageBytes, encode_example, iter_samples, list_shards, write_shard
from embedkit.data.stream import ShardStream
from embedkit.errors import UserError
from tests.helpers.http_shards import serve

LAYOUT = {"A": 3, "B": 2}  # source -> shards, 8 samples each
PER_SHARD = 8


def _png(i: int) -> ImageBytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (i * 7 % 256, i * 13 % 256, 90)).save(buf, format="PNG")
    return ImageBytes(buf.getvalue(), "png")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    n = 0
    for src, count in LAYOUT.items():
        for s in range(count):
            samples = []
            for i in range(PER_SHARD):
                ex = Example(query=Item(text=f"{src}-{s}-{i}"), positive=Item(text=f"p{n}", image=_png(n)),
                             negatives=[], task=src)
                samples.append(encode_example(ex, f"{src}{s}x{i:03d}"))
                n += 1
            write_shard(root / src / f"train-{s:06d}.tar", samples)
    return root


@pytest.fixture
def server(root, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF", 0.01)
    with serve(root) as srv:
        yield srv


def local_shards(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.tar"))


def urls(srv, root: Path) -> list[str]:
    return [f"{srv.url}/{Path(p).relative_to(root).as_posix()}" for p in local_shards(root)]


def identity(items):
    return list(items)


def epoch(shards, **kw) -> list[list[Example]]:
    """One pass: as many steps as samples / 4 (with one source and no shuffle buffer, each sample once)."""
    total = len(shards) * PER_SHARD
    st = ShardStream(shards, ChunkCollate(identity, chunk_size=4, num_negatives=0), 4, seed=5,
                     epoch_steps=total // 4, **{"shuffle_buffer": 1, **kw})
    return list(st.batches(0, 1, epoch=0))


def flat(batches) -> list[tuple]:
    return [(ex.task, ex.query.text, ex.positive.text, ex.positive.image.tobytes()) for b in batches for ex in b]


@pytest.mark.parametrize("ranges", [True, False], ids=["range-resume", "reread-and-skip"])
def test_dropped_connection_mid_shard_gives_the_local_stream_each_sample_once(root, server, ranges):
    server.ranges = ranges
    dropped = "/A/train-000001.tar"
    server.drop[dropped] = 1  # its first GET is cut half-way
    one_source = slice(0, LAYOUT["A"])  # one source: the epoch is exactly its samples, in read order
    local, remote_batches = epoch(local_shards(root)[one_source]), epoch(urls(server, root)[one_source])
    assert server.dropped == [dropped]  # the connection was cut once, mid-shard
    again = [r for p, r in server.requests if p == dropped][1]
    assert (again is not None and again.startswith("bytes=")) if ranges else True
    assert flat(remote_batches) == flat(local)  # the same batches, in the same order
    counts = Counter(t[1] for t in flat(remote_batches))
    assert len(counts) == LAYOUT["A"] * PER_SHARD and set(counts.values()) == {1}  # each sample once


def test_mixed_shuffled_stream_over_http_equals_the_local_one(root, server):
    server.drop["/B/train-000000.tar"] = 1
    assert flat(epoch(urls(server, root), shuffle_buffer=5)) == flat(epoch(local_shards(root), shuffle_buffer=5))


def test_brace_expansion_and_prefix_listing(root, server):
    expected = urls(server, root)
    assert list_shards(f"{server.url}/A/train-{{000000..000002}}.tar") == expected[:3]
    assert list_shards(f"{server.url}/") == expected  # fsspec walks the index pages
    assert checked_shards("data.train.shards", f"{server.url}/B/") == expected[3:]


def test_missing_shard_is_one_line_naming_the_url(server):
    url = f"{server.url}/A/train-{{000000..000009}}.tar"
    with pytest.raises(UserError) as err:
        checked_shards("data.train.shards", f"{server.url}/C/train-000000.tar")
    msg = str(err.value)
    assert msg.startswith("data.train.shards: shard http://127.0.0.1:") and "C/train-000000.tar" in msg
    assert "404" in msg and "\n" not in msg
    # a shard that vanishes mid-run stops the stream (no silent skip), naming the URL: whichever
    # of the absent ones (LAYOUT["A"] .. 9) the stream's shard order reaches first
    with pytest.raises(remote.ShardUnavailable) as err:
        epoch(list_shards(url))
    missing = {f"A/train-{k:06d}.tar: HTTP 404" for k in range(LAYOUT["A"], 10)}
    assert any(m in str(err.value) for m in missing), str(err.value)


def test_retries_are_bounded(root, server, monkeypatch):
    monkeypatch.setattr(remote, "RETRIES", 3)  # tries without progress: every try here stops at the same byte
    server.ranges = False
    server.drop["/A/train-000000.tar"] = "always"
    with pytest.raises(remote.ShardUnavailable) as err:
        list(iter_samples(f"{server.url}/A/train-000000.tar"))
    assert "unreadable after 3 tries" in str(err.value) and "/A/train-000000.tar" in str(err.value)
    assert len(server.dropped) == 3


def test_pipe_command(root, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF", 0.01)
    monkeypatch.setattr(remote, "RETRIES", 2)
    shard = local_shards(root)[0]
    assert [k for k, _ in iter_samples(f"pipe:cat {shard}")] == [k for k, _ in iter_samples(shard)]
    with pytest.raises(remote.ShardUnavailable, match=r"pipe:cat /nonexistent.tar: unreadable after 2 tries"):
        list(iter_samples("pipe:cat /nonexistent.tar"))


def test_worker_reraise_keeps_one_line():
    from torch.utils.data import DataLoader

    st = ShardStream(["http://127.0.0.1:9/A/train-000000.tar"], ChunkCollate(identity, 4, 0), 4, seed=0,
                     shuffle_buffer=1)
    remote.RETRIES, saved = 1, remote.RETRIES
    try:
        with pytest.raises(UserError) as err:
            next(iter(DataLoader(st, batch_size=None, num_workers=1)))
    finally:
        remote.RETRIES = saved
    assert "\n" not in str(err.value) and "http://127.0.0.1:9/A/train-000000.tar" in str(err.value)


def test_local_paths_never_reach_the_remote_module():
    assert not remote.is_remote("/data/shards/train-{000000..000003}.tar")
    assert not remote.is_remote("shards/x.tar") and not remote.is_remote("file:///x.tar")
    assert remote.is_remote("s3://bucket/p/") and remote.is_remote("pipe:cat x") and remote.is_remote("https://h/x.tar")
