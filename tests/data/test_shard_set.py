"""The shard set: one counting rule (a cut tar counted alike by the stream and the schedule), the
manifest's round trip, counts read from the manifest without opening (or downloading) a tar, and
manifests written by earlier versions still read."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from embedkit.data import remote
from embedkit.data.batch import ChunkCollate
from embedkit.data.schema import Example, Item
from embedkit.data.shard_set import MANIFEST, ShardSet, manifest_dumps, write_manifest
from embedkit.data.shards import count_samples, encode_example, iter_samples, write_shard
from embedkit.data.stream import ShardStream
from embedkit.training.optim import count_examples
from tests.data.test_stream import _png
from tests.helpers.http_shards import serve


def _samples(tag: str, n: int, image: bool = True) -> list[dict[str, bytes]]:
    """``n`` samples of two members each (json + query image) when ``image``, else one."""
    return [encode_example(Example(Item(f"{tag}-q{i}", _png((i, 0, 0)) if image else None), Item(f"{tag}-p{i}"),
                                   [], tag), f"{tag}x{i:03d}") for i in range(n)]


def _yielded(path) -> int:
    """Samples the stream's tar reader yields before a cut stops it."""
    got = 0
    try:
        for _ in iter_samples(path):
            got += 1
    except tarfile.ReadError:
        pass
    return got


def _cuts(path: Path) -> dict[str, int]:
    """Byte offsets that cut a tar at every kind of place."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last, second = members[-1], members[1]
    return {"intact": path.stat().st_size, "no end block": last.offset_data + last.size,
            "inside the last data": last.offset_data + 3, "inside a header": last.offset + 100,
            "at a header": last.offset, "inside a sample's second member": second.offset_data + 5}


def test_a_cut_tar_is_counted_as_the_stream_reads_it_by_the_stream_and_the_schedule(tmp_path):
    whole = tmp_path / "whole.tar"
    write_shard(whole, _samples("A", 5))
    data = whole.read_bytes()
    seen = {}
    for what, cut in _cuts(whole).items():
        shard = tmp_path / "root" / "A" / "train-000000.tar"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(data[:cut])
        yielded = _yielded(shard)
        seen[what] = yielded
        assert count_samples(str(shard)) == yielded, what  # the reader's seek (ShardSet.shard_count)
        assert ShardSet([str(shard)]).shard_count("A", str(shard)) == yielded, what
        assert count_examples([str(shard)]) == yielded, what  # the schedule (trainer.max_epochs)
    # the old rules disagreed here: the stream's header count kept a cut tar's last sample when the cut
    # fell on or inside a header, the schedule's raised on a cut inside data
    assert seen == {"intact": 5, "no end block": 4, "inside the last data": 4, "inside a header": 4,
                    "at a header": 4, "inside a sample's second member": 0}


def test_a_cut_tar_gives_the_stream_exactly_its_counted_samples_per_pass(tmp_path):
    """A resumed stream over a cut tar lands where the uninterrupted one is: the count its seek uses
    is the number of samples a pass yields."""
    shard = tmp_path / "A" / "train-000000.tar"
    write_shard(shard, _samples("A", 6))
    shard.write_bytes(shard.read_bytes()[:_cuts(shard)["inside a header"]])
    n = count_samples(str(shard))
    st = ShardStream([str(shard)], ChunkCollate(list, 1, 0), 1, seed=0, shuffle_buffer=1, epoch_steps=3 * n)
    texts = [b[0].query.text for b in st.batches(0, 1)]
    assert len(set(texts[:n])) == n  # one pass = n distinct samples
    assert set(texts[n:2 * n]) == set(texts[:n])
    resumed = ShardStream([str(shard)], ChunkCollate(list, 1, 0), 1, seed=0, shuffle_buffer=1, epoch_steps=3 * n)
    assert [b[0].query.text for b in resumed.batches(0, 1, start=n + 2)] == texts[n + 2:]


def _write_set(root: Path, layout: dict[str, list[int]], modality: dict[str, str] | None = None) -> list[str]:
    """Shards under ``root/<source>/`` ({source: samples per shard}) and a manifest recording them."""
    subsets, shards = {}, []
    for name, sizes in layout.items():
        entry = {"count": sum(sizes), "shards": []}
        for k, n in enumerate(sizes):
            rel = f"{name}/train-{k:06d}.tar"
            write_shard(root / rel, _samples(f"{name}{k}", n, image=(modality or {}).get(name, "image") == "image"))
            entry["shards"].append({"path": rel, "count": n})
            shards.append(str(root / rel))
        if modality:
            entry["query_modality"] = modality[name]
        subsets[name] = entry
    write_manifest(root, {"subsets": subsets, "mining": {"seed": 0}})
    return shards


def test_manifest_round_trip(tmp_path):
    shards = _write_set(tmp_path, {"A": [3, 2], "B": [4]}, modality={"A": "image", "B": "text"})
    path = tmp_path / MANIFEST
    assert path.read_text() == manifest_dumps(json.loads(path.read_text()))  # one format, deterministic
    s = ShardSet(shards)
    assert s.sources == {"A": shards[:2], "B": shards[2:]}
    assert [s.count(n) for n in s.sources] == [5, 4] and s.total() == 9 == count_examples(shards)
    assert s.query_modality("A") == "image" and s.query_modality("B") == "text"
    assert s.manifest_sha256("mining") == hashlib.sha256(path.read_bytes()).hexdigest()
    assert s.manifest_sha256("nothing") is None
    # without a manifest, the same counts from the tars; the modality from the samples
    path.unlink()
    bare = ShardSet(shards)
    assert bare.recorded_count("A") is None and bare.total() == 9 and bare.query_modality("B") == "text"
    assert bare.manifest_sha256("mining") is None


def test_counts_come_from_the_manifest_without_opening_a_tar(tmp_path):
    shards = _write_set(tmp_path, {"A": [3, 2], "B": [4]})
    for s in shards:  # the manifest is all that is left
        Path(s).unlink()
    s = ShardSet(shards)
    assert s.count("A") == 5 and s.total() == 9 == count_examples(shards)
    assert sum(count_samples(x) for x in shards) == 0  # what counting the (absent) tars would give


def test_remote_counts_come_from_the_manifest_not_the_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "BACKOFF", 0.01)
    _write_set(tmp_path, {"A": [3, 2], "B": [4]})
    with serve(tmp_path) as srv:
        urls = [f"{srv.url}/{rel}" for rel in ("A/train-000000.tar", "A/train-000001.tar", "B/train-000000.tar")]
        s = ShardSet(urls)
        assert s.total() == 9 and [s.shard_count("A", u) for u in urls[:2]] == [3, 2]
        assert s.manifest_sha256("mining") == hashlib.sha256((tmp_path / MANIFEST).read_bytes()).hexdigest()
        assert {p for p, _ in srv.requests} == {"/manifest.json"}  # no shard was downloaded
        (tmp_path / MANIFEST).unlink()  # a set without a manifest: counted by reading the shards
        s = ShardSet(urls)
        assert s.recorded_count("A") is None and s.shard_count("A", urls[1]) == 2
        assert "/A/train-000001.tar" in {p for p, _ in srv.requests}


def test_manifests_written_by_earlier_versions_still_read(tmp_path):
    """Byte for byte as ``data mmeb`` (no trailing newline, no query_modality) and ``mine`` (no per-shard
    counts) wrote them before the shard set owned the file."""
    (tmp_path / "mmeb").mkdir()
    mmeb_shards = [str(tmp_path / "mmeb" / "VOC2007" / "train-000000.tar")]
    write_shard(mmeb_shards[0], _samples("V", 2))
    (tmp_path / "mmeb" / MANIFEST).write_text(json.dumps({
        "format": 1, "split": "original", "src": "/data/MMEB-train", "images": "/data/MMEB-train",
        "subsets": {"VOC2007": {"meta_task": "classification", "cap": 50000, "count": 7500, "bytes": 123,
                                "digest": "0" * 64, "skipped": {},
                                "shards": [{"path": "VOC2007/train-000000.tar", "count": 7500, "bytes": 123,
                                            "sha256": "1" * 64}], "source": ["/data/x.parquet"]}},
        "total": {"count": 7500, "bytes": 123, "skipped": {}}}, indent=1, sort_keys=True))
    assert ShardSet(mmeb_shards).count("VOC2007") == 7500 == count_examples(mmeb_shards)
    assert ShardSet(mmeb_shards).query_modality("VOC2007") == "image"  # not recorded: probed
    mined = tmp_path / "mined"
    mined_shards = [str(mined / "A" / "train-000000.tar")]
    write_shard(mined_shards[0], _samples("A", 2, image=False))
    old = {"mining": {"considered": 4, "dropped": {"duplicate": 0, "false_negative": 1}, "kept": 3, "seed": 0},
           "subsets": {"A": {"count": 2}}}
    (mined / MANIFEST).write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    s = ShardSet(mined_shards)
    assert s.count("A") == 2 and s.query_modality("A") == "text"
    assert s.manifest_sha256("mining") == hashlib.sha256((mined / MANIFEST).read_bytes()).hexdigest()


def test_a_flat_mined_set_is_the_subset_dot_of_its_own_manifest(tmp_path):
    shard = tmp_path / "train-000000.tar"
    write_shard(shard, _samples("F", 3))
    write_manifest(tmp_path, {"subsets": {".": {"count": 3}}, "mining": {}})
    s = ShardSet([str(shard)])
    assert s.recorded_count(next(iter(s.sources))) == 3 and s.manifest_sha256("mining") is not None
