"""Shards of items with several images or a video (embedkit/data/shards.py), read with the run's frame
policy and image cap; hostile visuals are skipped and counted by reason, an image over the cap is
resized and counted as a resize. Every video here is written by PyAV in the test."""

from __future__ import annotations

import io
import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from embedkit.data.batch import ChunkCollate
from embedkit.data.schema import Example, Item
from embedkit.data.shards import (
    SKIP_REASONS,
    BadSample,
    Decoding,
    VideoBytes,
    decode_sample,
    encode_example,
    iter_samples,
    write_shard,
)
from embedkit.data.stream import ShardStream
from embedkit.data.video import FramePolicy, frames_from_images, read_video
from tests.helpers.images import speckled_image
from tests.helpers.videos import lossless_mp4


def _pixels(i: int) -> np.ndarray:
    """Frame i: a flat background and an 8x8 square that moves 3 pixels a frame."""
    a = np.full((48, 64, 3), (20, 40, 60), np.uint8)
    a[10:18, (i * 3) % 56:(i * 3) % 56 + 8] = (255, 200, (i * 20) % 256)
    return a


def _mp4(n: int) -> bytes:
    """An MP4 of frames 0..n-1 at 10 frames a second (lossless: RGB within 2)."""
    return lossless_mp4([_pixels(i) for i in range(n)])


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _one(files: dict, key: str = "k", **kw) -> Example:
    return decode_sample(key, files, **kw)


# ---- the codec


def test_three_images_round_trip_in_order_each_member_declared_by_the_json():
    images = [speckled_image(8 + i, 6, i) for i in range(3)]
    files = encode_example(Example(Item("<|image_1|> a <|image_2|> b <|image_3|>", images=images), Item("p")), "k")
    meta = json.loads(files["k.json"])
    assert meta["query"] == {"text": "<|image_1|> a <|image_2|> b <|image_3|>", "images": ["img1.png", "img2.png",
                                                                                          "img3.png"]}
    assert sorted(files) == ["k.json", "k.q.img1.png", "k.q.img2.png", "k.q.img3.png"]
    got = _one(files).query
    assert [im.tobytes() for im in got.images] == [im.tobytes() for im in images]
    assert got.text == "<|image_1|> a <|image_2|> b <|image_3|>"


def test_a_one_image_item_is_still_written_in_the_first_form_and_old_shards_read():
    files = encode_example(Example(Item("q", speckled_image(8, 8, 0)), Item("p")), "k")
    assert sorted(files) == ["k.json", "k.q.png"] and json.loads(files["k.json"])["query"] == {"text": "q", "image": "png"}
    assert _one(files).query.image.tobytes() == speckled_image(8, 8, 0).tobytes()


def test_a_video_file_and_its_frames_stored_as_images_decode_to_the_same_frames():
    n, policy = 13, FramePolicy(num_frames=4)
    data = _mp4(n)
    everything = read_video(data, FramePolicy(num_frames=n))  # every frame, with its timestamp
    assert len(everything.images) == n
    as_frames = encode_example(Example(Item("v", video=everything), Item("p")), "f")
    as_video = encode_example(Example(Item("v"), Item("p")), "m", videos={"q": VideoBytes(data, "mp4")})
    assert "m.q.video.mp4" in as_video and json.loads(as_video["m.json"])["query"]["video"] == "video.mp4"
    assert json.loads(as_frames["f.json"])["query"]["frames"][:2] == ["frame000.png", "frame001.png"]
    a, b = _one(as_frames, "f", policy=policy).query.video, _one(as_video, "m", policy=policy).query.video
    assert a.indices == b.indices == [0, 4, 8, 12]
    assert a.timestamps == pytest.approx(b.timestamps) and b.timestamps == pytest.approx([0.0, 0.4, 0.8, 1.2])
    for x, y, i in zip(a.images, b.images, b.indices):
        assert x.tobytes() == y.tobytes()
        assert np.abs(np.asarray(y, dtype=int) - _pixels(i)).max() <= 2, f"frame {i}"


@pytest.mark.parametrize("policy", [FramePolicy(num_frames=3), FramePolicy(num_frames=5, max_pixels=500),
                                    FramePolicy(num_frames=4, sampling="fps", fps=3.0)])
def test_a_frames_slot_gives_what_frames_from_images_gives_decoding_only_the_picked_frames(policy):
    images = [Image.fromarray(_pixels(i)) for i in range(7)]
    stamps = [0.1 * i for i in range(7)]
    files = encode_example(Example(Item("v", video=frames_from_images(images, stamps, FramePolicy(num_frames=7))),
                                   Item("p")), "k")
    want, got = frames_from_images(images, stamps, policy), _one(files, policy=policy).query.video
    assert (got.indices, got.timestamps, got.source_frames) == (want.indices, want.timestamps, want.source_frames)
    assert [im.tobytes() for im in got.images] == [im.tobytes() for im in want.images]
    unpicked = next(i for i in range(7) if i not in want.indices)
    files[f"k.q.frame{unpicked:03d}.png"] = b"corrupt, never decoded"
    assert _one(files, policy=policy).query.video.indices == want.indices


def test_fps_sampling_of_frames_without_timestamps_is_refused_as_video():
    with pytest.raises(BadSample) as err:
        _one(_video_sample(4), policy=FramePolicy(sampling="fps", fps=2.0))
    assert err.value.reason == "video" and "timestamps" in str(err.value)


def test_fps_sampling_reads_the_frames_timestamps_from_the_json():
    frames = frames_from_images([Image.fromarray(_pixels(i)) for i in range(10)], [0.1 * i for i in range(10)],
                                FramePolicy(num_frames=10))
    files = encode_example(Example(Item("v", video=frames), Item("p")), "k")
    got = _one(files, policy=FramePolicy(num_frames=8, sampling="fps", fps=2.5)).query.video
    assert got.indices == [0, 4, 8] and got.timestamps == pytest.approx([0.0, 0.4, 0.8])


def _video_sample(n: int = 6, key: str = "k") -> dict:
    frames = frames_from_images([Image.fromarray(_pixels(i)) for i in range(n)], None, FramePolicy(num_frames=n))
    return encode_example(Example(Item("v", video=frames), Item("p")), key)


def _json(files: dict, key: str = "k") -> dict:
    return json.loads(files[f"{key}.json"])


def _with_json(files: dict, meta: dict, key: str = "k") -> dict:
    return {**files, f"{key}.json": json.dumps(meta).encode()}


def _drop(files: dict, name: str) -> dict:
    return {k: v for k, v in files.items() if k != name}


def _bomb(files: dict) -> dict:
    return {**files, "k.q.frame002.png": _png(Image.new("RGB", (200, 200)))}


def _two_kinds(files: dict) -> dict:
    meta = _json(files)
    meta["query"]["images"] = ["frame000.png"]
    return _with_json(files, meta)


def _bad_stamps(files: dict) -> dict:
    meta = _json(files)
    meta["query"]["timestamps"] = [0.0]
    return _with_json(files, meta)


def _empty_video(files: dict) -> dict:
    return encode_example(Example(Item("v"), Item("p")), "k", videos={"q": VideoBytes(b"", "mp4")})


@pytest.mark.parametrize("mutate, reason", [
    (lambda f: _drop(f, "k.q.frame003.png"), "missing_member"),  # never a silent text-only or shorter item
    (lambda f: {**f, "k.q.frame001.png": b"not a png"}, "decode"),  # a corrupt frame
    (_bomb, "image_too_large"),  # its header states more pixels than PIL.Image.MAX_IMAGE_PIXELS (1000 here)
    (_two_kinds, "bad_json"),
    (_bad_stamps, "bad_json"),
    (_empty_video, "video"),  # a zero-length video file
])
def test_a_hostile_visual_is_one_line_with_its_reason(mutate, reason, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16000)  # the 200x200 frame: over twice it (PIL raises)
    files = mutate(_video_sample())
    with pytest.raises(BadSample) as err:
        _one(files)
    assert err.value.reason == reason and reason in SKIP_REASONS and "\n" not in str(err.value)


def test_a_video_shorter_than_min_frames_is_video_short():
    with pytest.raises(BadSample) as err:
        _one(_video_sample(3), policy=FramePolicy(min_frames=4))
    assert err.value.reason == "video_short"
    files = encode_example(Example(Item("v"), Item("p")), "k", videos={"q": VideoBytes(_mp4(3), "mp4")})
    with pytest.raises(BadSample) as err:
        _one(files, policy=FramePolicy(min_frames=4))
    assert err.value.reason == "video_short"


def test_a_decompression_bomb_image_is_refused_as_image_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    files = encode_example(Example(Item("q", images=[speckled_image(8, 8, 0), speckled_image(40, 40, 1)]),
                                   Item("p")), "k")
    with pytest.raises(BadSample) as err:  # 1600 pixels: PIL only warns (1x to 2x its limit); refused all the same
        _one(files)
    assert err.value.reason == "image_too_large" and "k.q.img2.png" in str(err.value)


def test_an_image_over_the_pixel_cap_is_resized_aspect_kept_and_reported():
    files = encode_example(Example(Item("q", images=[speckled_image(80, 40, 0), speckled_image(8, 8, 1)]),
                                   Item("p", speckled_image(10, 10, 2))), "k")
    told = []
    got = _one(files, max_image_pixels=800, on_resize=told.append)
    assert [im.size for im in got.query.images] == [(40, 20), (8, 8)] and got.positive.image.size == (10, 10)
    assert told == ["k.q.img1.png: 80x40 resized to 40x20 (data.max_image_pixels=800)"]
    assert _one(files).query.images[0].size == (80, 40)  # no cap: native size


def test_encode_example_refuses_a_video_for_a_slot_with_visuals_or_one_it_lacks():
    ex = Example(Item("q", speckled_image(8, 8, 0)), Item("p"))
    with pytest.raises(ValueError, match="slot q: a stored video file and the item's own visuals"):
        encode_example(ex, "k", videos={"q": VideoBytes(b"x", "mp4")})
    with pytest.raises(ValueError, match="videos for slot 'n0', which the example lacks"):
        encode_example(ex, "k", videos={"n0": VideoBytes(b"x", "mp4")})


# ---- the run's policy: config, pickling, the stream


def test_the_decoding_comes_from_the_data_section_and_pickles():
    from embedkit.config.loader import compose
    from embedkit.errors import ConfigError

    cfg = compose(["recipe=demo", "data.video.num_frames=3", "data.video.min_frames=2", "data.max_image_pixels=900"])
    d = Decoding.from_config(cfg["data"])
    assert d == Decoding(FramePolicy(num_frames=3, min_frames=2), 900) == pickle.loads(pickle.dumps(d))
    assert Decoding.from_config({}) == Decoding()
    assert len(d.decode("k", _video_sample(7)).query.video.images) == 3
    with pytest.raises(ConfigError, match="data.video.fps: only for data.video.sampling=fps"):
        compose(["recipe=demo", "data.video.fps=2"])


def test_a_stream_skips_and_counts_hostile_visuals_and_counts_resizes(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
    samples = []
    for i in range(16):  # the bad ones (1, 2, 3, 5) all lie in the first windows the 9 good examples need
        key = f"s{i:03d}"
        if i % 4 == 0:  # good video samples, 6 frames
            samples.append(_video_sample(6, key))
        elif i == 1:  # a corrupt frame
            samples.append({**_video_sample(6, key), f"{key}.q.frame003.png": b"broken"})  # picked: 0, 1, 3, 5
        elif i == 2:  # too short for min_frames=4
            samples.append(_video_sample(2, key))
        elif i == 5:  # a zero-length video file
            samples.append(encode_example(Example(Item(""), Item("p")), key, videos={"q": VideoBytes(b"", "mp4")}))
        elif i == 3:  # a decompression bomb
            samples.append(encode_example(Example(Item("q", speckled_image(200, 120, i)), Item("p")), key))
        else:  # an image over the cap: resized, not skipped
            samples.append(encode_example(Example(Item(f"q{i}", speckled_image(60, 30, i)), Item("p")), key))
    write_shard(tmp_path / "train-000000.tar", samples)
    st = ShardStream([str(tmp_path / "train-000000.tar")], ChunkCollate(lambda items: items, 3, 0), 3, seed=0,
                     shuffle_buffer=4, epoch_steps=3,
                     decoding=Decoding(FramePolicy(num_frames=4, min_frames=4), max_image_pixels=450))
    with caplog.at_level(logging.WARNING):
        batches = list(st)
    assert st.skipped_by_reason == {"decode": 1, "video_short": 1, "image_too_large": 1, "video": 1}
    assert st.resized >= 1 and "resized s0" in caplog.text and "60x30 resized to 30x15" in caplog.text
    assert len(batches) == 3 and sum(sum(b.skipped.values()) for b in batches) == 4


def test_the_decoding_reaches_validation_examples(tmp_path):
    from embedkit.data.datamodule import read_examples

    write_shard(tmp_path / "val-000000.tar", [_video_sample(9, f"v{i}") for i in range(3)])
    got = read_examples([str(tmp_path / "val-000000.tar")], 10, decoding=Decoding(FramePolicy(num_frames=2)))
    assert [len(e.query.video.images) for e in got] == [2, 2, 2]
    assert [k for k, _ in iter_samples(tmp_path / "val-000000.tar")] == ["v0", "v1", "v2"]


# ---- embedkit mine: slots with several images or a video


class _Encoder:
    """A mining model: a fixed random vector per example number (``q3`` and ``t3`` alike: every query finds its
    positive first); records the frames it saw."""

    def __init__(self, decoding: Decoding):
        self.decoding, self.frames_seen, self.pixels_seen = decoding, [], []

    def encode_items(self, items, batch_size=32, **engine):
        import torch

        out = []
        for it in items:
            if it.video is not None:
                self.frames_seen.append(len(it.video.images))
            self.pixels_seen += [im.size[0] * im.size[1] for im in it.images]
            out.append(torch.randn(16, generator=torch.Generator().manual_seed(int(it.text[1:]))))
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def test_mining_copies_image_and_video_slots_verbatim_and_decodes_them_with_the_models_policy(tmp_path):
    from embedkit.mining.judges.embedding import EmbeddingJudge
    from embedkit.mining.miner import Miner, MineSettings, SlotItems, read_shard

    def target(i):
        if i % 3 == 0:
            return Item(f"t{i}", images=[speckled_image(8, 6, i), speckled_image(6, 8, i + 50)])
        if i % 3 == 1:
            return Item(f"t{i}", video=frames_from_images([Image.fromarray(_pixels(i + j)) for j in range(6)], None,
                                                          FramePolicy(num_frames=6)))
        return Item(f"t{i}", speckled_image(8, 8, i))

    examples = [Example(Item(f"q{i}"), target(i), task="t") for i in range(9)]
    src = [encode_example(ex, f"{i:04d}") for i, ex in enumerate(examples)]
    write_shard(tmp_path / "src" / "train-000000.tar", src)
    shard = str(tmp_path / "src" / "train-000000.tar")
    encoder = _Encoder(Decoding(FramePolicy(num_frames=3), max_image_pixels=40))
    rows = read_shard(shard, encoder.decoding)
    assert [im.size for im in SlotItems([rows[0][3]]).sized(0).images] == [(8, 6), (6, 8)]  # headers only
    Miner(encoder, EmbeddingJudge(), {"t": [(shard, "t/train-000000.tar")]}, tmp_path / "out",
          MineSettings(num_negatives=2, window=(1, 4), threshold=10.0), log=lambda m: None).run()
    assert encoder.frames_seen and set(encoder.frames_seen) == {3}  # the mining model's policy, not the default 8
    assert encoder.pixels_seen and max(encoder.pixels_seen) <= 40  # and its image cap (one image or several)
    by_text = {ex.positive.text: files for ex, files in zip(examples, src)}
    for key, files in iter_samples(tmp_path / "out" / "t" / "train-000000.tar"):
        meta = json.loads(files[f"{key}.json"])
        assert len(meta["negatives"]) == 2
        for n, slot in enumerate(meta["negatives"]):  # each negative is a source positive's slot, byte for byte
            source = by_text[slot["text"]]
            skey = next(k for k in source if k.endswith(".json"))[:-5]
            assert slot == json.loads(source[f"{skey}.json"])["positive"]
            members = {k.split(".", 2)[2]: v for k, v in source.items() if k.startswith(f"{skey}.p.")}
            assert members and members == {k.split(".", 2)[2]: v for k, v in files.items()
                                           if k.startswith(f"{key}.n{n}.")}
        ex = decode_sample(key, files, FramePolicy(num_frames=2))
        assert all(len(neg.video.images) == 2 for neg in ex.negatives if neg.video is not None)


def _frames_of(items) -> list[int]:
    return [len(it.video.images) for it in items]


def test_the_frame_policy_reaches_the_loader_workers(tmp_path):
    """The stream (and its Decoding) pickled into a DataLoader worker samples each video by the run's policy."""
    from torch.utils.data import DataLoader

    write_shard(tmp_path / "train-000000.tar",
                [encode_example(Example(Item(f"v{i}", video=frames_from_images(
                    [Image.fromarray(_pixels(i + j)) for j in range(7)], None, FramePolicy(num_frames=7))),
                    Item(f"p{i}")), f"s{i:03d}") for i in range(6)])
    st = ShardStream([str(tmp_path / "train-000000.tar")], ChunkCollate(lambda items: items, 3, 0), 3, seed=0,
                     shuffle_buffer=2, epoch_steps=2, decoding=Decoding(FramePolicy(num_frames=2)))
    batches = list(DataLoader(st, batch_size=None, num_workers=1))
    assert len(batches) == 2 and all(_frames_of(b.query_chunks[0]) == [2, 2, 2] for b in batches)


def test_a_source_of_video_or_several_image_queries_is_a_visual_source_for_modality_grouping(tmp_path):
    from embedkit.data.shard_set import ShardSet

    for name, query in (("video", lambda i: _video_sample(3, f"s{i}")),
                        ("images", lambda i: encode_example(Example(Item("q", images=[speckled_image(6, 6, i)] * 2),
                                                                    Item("p")), f"s{i}")),
                        ("text", lambda i: encode_example(Example(Item("q"), Item("p")), f"s{i}"))):
        write_shard(tmp_path / name / "train-000000.tar", [query(i) for i in range(3)])
    shards = ShardSet({n: [str(tmp_path / n / "train-000000.tar")] for n in ("video", "images", "text")})
    assert [shards.query_modality(n) for n in ("video", "images", "text")] == ["image", "image", "text"]


def test_the_data_module_reads_with_the_configs_decoding():
    from embedkit.config.loader import compose
    from embedkit.data.datamodule import EmbeddingDataModule

    cfg = compose(["recipe=demo", "data.video.num_frames=5", "data.video.sampling=fps", "data.video.fps=2",
                   "data.max_image_pixels=4096"])
    dm = EmbeddingDataModule(cfg["data"], None, [], [], seed=0, global_batch_size=2, chunk_size=2)
    assert dm.decoding == Decoding(FramePolicy(num_frames=5, sampling="fps", fps=2.0), 4096)
