"""Hostile training data: every sample is trained on or skipped and counted by reason, never a crash.

A sample the backbone's processor would refuse is skipped when it is drawn (``ChunkProcessor.refusal``),
before it takes a place in a batch; decode failures are counted by reason; the counts reach the module,
the run's log and MLflow (``data/skipped/<reason>``)."""

from __future__ import annotations

import io
import itertools
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedkit.backbones.qwen2_vl.adapter import Qwen2VLBackbone
from embedkit.data.batch import ChunkCollate
from embedkit.data.schema import Example, Item
from embedkit.data.shards import BadSample, decode_sample, encode_example, to_rgb, write_shard
from embedkit.data.stream import ShardStream
from tests.helpers.images import speckled_image

PH = "<|image_1|>"


def _mmeb_source(root: Path, rows: int = 200, bad_row: int = 137) -> tuple[Path, Path]:
    """One MMEB-style subset of ``rows`` image->text rows; row ``bad_row``'s image is 2 x 800 (1:400)."""
    src, images = root / "MMEB-train", root / "images"
    recs = []
    for i in range(rows):
        path = images / "ImgCls" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        (Image.new("RGB", (2, 800), (200, 10, 10)) if i == bad_row else speckled_image(16, 16, i)).save(path)
        recs.append({"qry": f"{PH} Represent the given image for classification", "qry_image_path": f"ImgCls/{i}.png",
                     "pos_text": f"label {i}", "pos_image_path": "", "neg_text": None, "neg_image_path": None})
    (src / "ImgCls").mkdir(parents=True)
    cols = {k: pa.array([r[k] for r in recs], pa.string()) for k in recs[0]}
    pq.write_table(pa.table(cols), src / "ImgCls" / "original-00000-of-00001.parquet")
    return src, images


def test_an_image_of_aspect_1_to_400_among_200_mmeb_rows_is_skipped_and_the_fit_finishes(tmp_path, monkeypatch,
                                                                                          caplog):
    import mlflow

    from embedkit.cli import main as cli_main
    from embedkit.commands.data import main as data_main

    src, images = _mmeb_source(tmp_path)
    shards = tmp_path / "shards"
    assert data_main(["mmeb", f"src={src}", f"images={images}", f"out={shards}", "shard_size=50"]) == 0
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # 25 steps x 8 examples: the whole first pass (the bad sample met once) and one sample of the second
    args = ["fit", "recipe=demo", f"data.train.shards={shards}", "trainer.max_steps=25", f"run.dir={tmp_path / 'run'}",
            "train.global_batch_size=8", "train.chunk_size=8", "data.train.num_workers=1",
            "data.train.shuffle_buffer=8", "data.train.task_batch_size=0", "data.demo.enabled=false",
            "trainer.log_every_n_steps=5", "tracking.enabled=true"]
    with caplog.at_level(logging.WARNING):
        assert cli_main(args) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert "data: 1 training sample skipped in all (processor 1)" in lines
    assert lines.count("data: 1 training sample skipped so far (processor 1)") == 1  # when it rose, once
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert run.data.metrics["data/skipped/processor"] == 1.0
    assert run.data.metrics["data/skipped/decode"] == 0.0


def _files(key="k1", image_bytes=None, ext="png", meta=None):
    ex = Example(Item("a query", speckled_image(8, 8, 1)), Item("a positive"), task="t")
    files = encode_example(ex, key)
    if image_bytes is not None:
        files[f"{key}.q.png"] = image_bytes
    if meta is not None:
        files[f"{key}.json"] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return files


@pytest.mark.parametrize("mutate,reason", [
    (lambda f: f.update({"k1.q.jpf": f.pop("k1.q.png")}), "missing_member"),  # a flipped tar header byte
    (lambda f: f.pop("k1.json"), "missing_member"),
    (lambda f: f.update({"k1.q.png": b"\x89PNG not really"}), "decode"),
    (lambda f: f.update({"k1.json": b'{"query": {"text": "a"'}), "bad_json"),
    (lambda f: f.update({"k1.json": b'[1, 2]'}), "bad_json"),
    (lambda f: f.update({"k1.json": b'{"query": {"text": "\xff\xfe"}, "positive": {"text": "b"}}'}), "bad_text"),
    (lambda f: f.update({"k1.json": b'{"query": {"text": "\\udc80"}, "positive": {"text": "b"}}'}), "bad_text"),
    (lambda f: f.update({"k1.json": b'{"query": {"text": 5}, "positive": {"text": "b"}}'}), "bad_text"),
    (lambda f: f.update({"k1.json": b'{"query": {"text": null}, "positive": {"text": "b"}}'}), "bad_text"),
])
def test_a_bad_sample_raises_with_its_reason(mutate, reason):
    files = _files()
    decode_sample("k1", dict(files))  # the unmutated sample decodes
    mutate(files)
    with pytest.raises(BadSample) as err:
        decode_sample("k1", files)
    assert err.value.reason == reason


def _png(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def test_images_become_rgb_with_exif_orientation_applied_and_transparency_over_white():
    p = Image.new("P", (4, 2), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    rgb = to_rgb(Image.open(io.BytesIO(_png(p, transparency=0))))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (255, 0, 0)
    la = to_rgb(Image.new("LA", (2, 2), (0, 0)))
    assert la.getpixel((0, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (2, 2))
    deep.putpixel((0, 0), 65535)
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255) and to_rgb(deep).getpixel((1, 1)) == (0, 0, 0)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("1", (2, 2), 1)).mode == "RGB"
    tall = Image.new("RGB", (4, 2), (0, 0, 0))
    exif = tall.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    tall.save(buf, format="JPEG", exif=exif)
    assert to_rgb(Image.open(io.BytesIO(buf.getvalue()))).size == (2, 4)


def _stream_of(tmp_path, examples: list[Example], processor, **kw) -> ShardStream:
    write_shard(tmp_path / "s" / "train-000000.tar", [encode_example(e, f"k{i:04d}") for i, e in enumerate(examples)])
    return ShardStream([str(tmp_path / "s" / "train-000000.tar")], ChunkCollate(processor, 4, 0), 4, seed=0,
                       shuffle_buffer=4, **kw)


def test_a_sample_the_processor_refuses_is_skipped_before_batching_and_carried_by_the_next_batch(tmp_path):
    processor = Qwen2VLBackbone(seed=0, tiny=True, min_pixels=56 * 56, max_pixels=56 * 56).make_processor()
    examples = [Example(Item(f"{PH} q{i}", speckled_image(1, 400, i) if i == 5 else speckled_image(16, 16, i)),
                        Item(f"p{i}"), task="t") for i in range(12)]
    assert processor.refusal(examples[5].query) and processor.refusal(examples[4].query) is None
    st = _stream_of(tmp_path, examples, processor, epoch_steps=2)
    batches = list(st)
    assert sorted(map(str, (b.skipped for b in batches))) == ["{'processor': 1}", "{}"]  # carried once
    assert st.skipped_by_reason == {"processor": 1} and all(b.per_device_batch == 4 for b in batches)


def test_every_family_refuses_what_its_processor_cannot_take():
    from embedkit.backbones.hf_text import HFText
    from embedkit.backbones.llava_onevision import LlavaOnevision
    from embedkit.backbones.phi3_v import Phi3V

    long_text = Item(" ".join(["word"] * 5000))
    for cls in (Qwen2VLBackbone, LlavaOnevision, Phi3V):
        proc = cls(seed=0, tiny=True).make_processor()
        assert proc.refusal(long_text), cls.__name__  # over the language model's positions (tiny: 4096)
        assert proc.refusal(Item(f"{PH} {PH} two", speckled_image(16, 16, 0))) or cls is Qwen2VLBackbone
        assert proc.refusal(Item("fine", speckled_image(16, 16, 0))) is None
    assert HFText(seed=0, tiny=True).make_processor().refusal(long_text) is None  # truncated instead


def _bad_stream_shards(tmp_path) -> list[str]:
    """Two shards of 12 samples; samples 2, 3 and 14 have images that do not decode."""
    paths = []
    for j in range(2):
        samples = []
        for i in range(12 * j, 12 * j + 12):
            files = encode_example(Example(Item(f"q{i}", speckled_image(8, 8, i)), Item(f"p{i}"), task="t"), f"s{i:03d}")
            if i in (2, 3, 14):
                files[f"s{i:03d}.q.png"] = b"broken"
            samples.append(files)
        write_shard(tmp_path / f"train-{j:06d}.tar", samples)
        paths.append(str(tmp_path / f"train-{j:06d}.tar"))
    return paths


@pytest.mark.parametrize("mode", [{}, {"length_order": "sorted", "accumulate": 3}, {"epoch_steps": 7}])
@pytest.mark.parametrize("start", [1, 4, 7, 9])
def test_a_resume_after_skipped_samples_reads_on_from_where_the_run_was(tmp_path, mode, start):
    shards = _bad_stream_shards(tmp_path)

    def stream(**kw):
        return ShardStream(shards, ChunkCollate(lambda items: items, 3, 0), 3, seed=1, shuffle_buffer=5, **mode, **kw)

    def texts(batches):
        return [[it.text for it in b.query_chunks[0]] for b in batches]

    def first(st, n):  # n batches, across epochs where the stream has them
        out = []
        while len(out) < n:
            out += list(itertools.islice(iter(st), n - len(out)))
        return out

    full = first(stream(), 14)
    assert sum(sum(b.skipped.values()) for b in full[:start]) >= 1  # skips happened before the resume point
    resumed = first(stream(start_step=start, resume_states={0: full[start - 1].reader_state}), 14 - start)
    assert texts(resumed) == texts(full[start:])
    if not mode:  # without the readers' state, the resumed readers start behind by the skips: the old drift
        assert texts(first(stream(start_step=start), 14 - start)) != texts(full[start:])


def test_a_fit_resumed_after_skipped_samples_equals_the_uninterrupted_fit(tmp_path, monkeypatch):
    """The data module keeps each worker's reader state in the checkpoint; a resumed fit reads on from it
    (without it the readers would start behind by the samples skipped before the checkpoint)."""
    import torch

    from embedkit.cli import main as cli_main

    shards = tmp_path / "shards"
    shards.mkdir()
    _bad_stream_shards(shards)
    monkeypatch.chdir(tmp_path)
    common = ["fit", "recipe=demo", f"data.train.shards={shards}", "data.demo.enabled=false",
              "train.global_batch_size=3", "train.chunk_size=3", "data.train.num_workers=1",
              "data.train.shuffle_buffer=5", "data.train.task_batch_size=0", "train.schedule=constant",
              "train.warmup=0", "tracking.enabled=false", "trainer.progress=none"]
    assert cli_main([*common, "trainer.max_steps=8", f"run.dir={tmp_path / 'whole'}"]) == 0
    assert cli_main([*common, "trainer.max_steps=4", f"run.dir={tmp_path / 'cut'}"]) == 0
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert cut["embedkit"]["data_skipped"]["decode"] >= 1  # skips before the resume point
    assert cli_main(["fit", f"resume={tmp_path / 'cut'}", "trainer.max_steps=8", "trainer.progress=none"]) == 0
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
            for r in ("whole", "cut"))
    assert max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item()
               for k in a["state_dict"]) <= 1e-6
    assert a["embedkit"]["data_skipped"] == b["embedkit"]["data_skipped"]


def test_validation_examples_skip_bad_samples_too(tmp_path, caplog):
    from embedkit.data.datamodule import read_examples

    shards = _bad_stream_shards(tmp_path)
    processor = Qwen2VLBackbone(seed=0, tiny=True, min_pixels=3136, max_pixels=3136).make_processor()
    with caplog.at_level(logging.WARNING):
        examples = read_examples(shards, 30, processor)
    assert [e.query.text for e in examples] == [f"q{i}" for i in range(24) if i not in (2, 3, 14)]
    assert "{'decode': 3}" in caplog.text


def test_a_source_with_no_usable_sample_stops_with_a_reason_instead_of_spinning(tmp_path):
    samples = []
    for i in range(5):
        files = encode_example(Example(Item(f"q{i}", speckled_image(8, 8, i)), Item(f"p{i}")), f"b{i}")
        files[f"b{i}.q.png"] = b"broken"
        samples.append(files)
    write_shard(tmp_path / "train-000000.tar", samples)
    st = ShardStream([str(tmp_path / "train-000000.tar")], ChunkCollate(lambda items: items, 2, 0), 2, seed=0,
                     shuffle_buffer=2)
    with pytest.raises(RuntimeError, match="no usable sample: 6 skipped in a row, the last as decode"):
        next(iter(st))


@pytest.mark.parametrize("start,epoch_steps", [(5, 0), (4, 0), (9, 7)])
def test_a_two_worker_loader_resumed_after_skips_reads_on_from_each_workers_saved_state(tmp_path, start, epoch_steps):
    """Both resume fixes at once: the worker asked first plays the role (steps, readers) of the one that
    built step ``start``, and that role's saved reader state (skips before the resume) is the one it reads on from,
    kept by role as the data module keeps it (``reader_state["worker"]``)."""
    from torch.utils.data import DataLoader

    shards = _bad_stream_shards(tmp_path)

    def loader(**kw):
        st = ShardStream(shards, ChunkCollate(lambda items: items, 3, 0), 3, seed=1, shuffle_buffer=5,
                         epoch_steps=epoch_steps, **kw)
        return DataLoader(st, batch_size=None, num_workers=2, persistent_workers=True)

    def texts(batches):
        return [[it.text for it in b.query_chunks[0]] for b in batches]

    def first(dl, n):
        out = []
        while len(out) < n:
            out += list(itertools.islice(iter(dl), n - len(out)))
        return out

    full = first(loader(), 16)
    assert sum(sum(b.skipped.values()) for b in full[:start]) >= 1  # skips before the resume point
    saved = {}
    for b in full[:start]:  # what the data module keeps as the batches are trained on
        saved[b.reader_state["worker"]] = b.reader_state
    resumed = loader(start_step=start, resume_states=saved)
    assert texts(first(resumed, 16 - start)) == texts(full[start:])
