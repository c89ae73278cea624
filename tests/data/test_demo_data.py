"""Demo data: deterministic in the seed, and a held-out split that really is held out."""

import hashlib
from pathlib import Path

from embedkit.data import demo
from embedkit.data.shards import decode_sample, iter_samples

PARAMS = dict(scenes="single", train_size=300, val_size=40, image_size=56, holdout_combinations=6,
              seed=7, cache_dir=None, text_only=False)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def _captions(shard):
    out = []
    for key, files in iter_samples(shard):
        ex = decode_sample(key, files)
        out.append(ex.query.text if ex.task == "demo_t2i" else ex.positive.text)
    return out


def test_same_seed_same_shards_other_seed_other_shards(tmp_path):
    a = demo.ensure_demo_shards({**PARAMS, "cache_dir": str(tmp_path / "a")}, log=lambda m: None)
    b = demo.ensure_demo_shards({**PARAMS, "cache_dir": str(tmp_path / "b")}, log=lambda m: None)
    c = demo.ensure_demo_shards({**PARAMS, "seed": 8, "cache_dir": str(tmp_path / "c")}, log=lambda m: None)
    assert _digest(a) == _digest(b)
    assert _digest(a)["val-000000.tar"] != _digest(c)["val-000000.tar"]


def test_generated_once_then_reused(tmp_path):
    p = {**PARAMS, "cache_dir": str(tmp_path)}
    messages = []
    first = demo.ensure_demo_shards(p, log=messages.append)
    again = demo.ensure_demo_shards(p, log=messages.append)
    assert first == again and len(messages) == 1
    assert not list(Path(tmp_path).rglob("*.tmp")) and not list((Path(tmp_path) / "demo").glob(".tmp-*"))


def test_split_holds_out_combinations_and_captions_are_unique(tmp_path):
    root = demo.ensure_demo_shards({**PARAMS, "cache_dir": str(tmp_path)}, log=lambda m: None)
    train = {c for shard in sorted(root.glob("*/train-*.tar")) for c in _captions(shard)}
    val = _captions(root / "val-000000.tar")
    held = demo.held_out_captions(PARAMS)
    assert len(val) == PARAMS["val_size"] and len(set(val)) == len(val)  # unique among candidates
    assert held and held <= set(val)  # every held-out combination is validated
    assert not (held & train)  # and never seen in training
    assert len(train) > 100  # training covers the rest of the space


def test_pair_scenes_hold_out_and_validate_by_scene_not_by_caption():
    """"A above B" and "B below A" are one scene: held out together, never both in validation."""
    p = {**PARAMS, "scenes": "pair", "val_size": 300, "holdout_combinations": 40}
    train, held = demo.split_combinations(p["scenes"], p["holdout_combinations"], p["seed"])
    train_scenes = {demo.scene_key(c) for c in train}
    assert len(held) == 40 and not {demo.scene_key(c) for c in held} & train_scenes
    assert len(train) == 2 * len(train_scenes)  # both phrasings of every training scene are trained
    val = [ex.query.text for ex in demo.val_examples(p)]
    by_caption = {demo.caption(c): c for c in train + held}
    keys = [demo.scene_key(by_caption[t]) for t in val]
    assert len(set(keys)) == len(keys) == 300
    assert any(demo.scene_key(c) != c for c in (by_caption[t] for t in val))  # both phrasings appear


def test_examples_go_both_ways_and_images_decode(tmp_path):
    root = demo.ensure_demo_shards({**PARAMS, "cache_dir": str(tmp_path)}, log=lambda m: None)
    folders = set()
    for shard in root.glob("*/train-*.tar"):
        folders.add(Path(shard).parent.name)
        for key, files in iter_samples(shard):
            ex = decode_sample(key, files)
            assert ex.task == Path(shard).parent.name  # one task per folder (subset)
            image = ex.positive.image if ex.task == "demo_t2i" else ex.query.image
            assert image.size == (56, 56) and image.mode == "RGB"
    assert folders == {"demo_t2i", "demo_i2t"}


def test_val_fresh_draws_differ_from_training_images():
    train_img = next(demo.train_examples(PARAMS, 0, 1))
    val = demo.val_examples(PARAMS)
    assert all(ex.task == "demo_t2i" for ex in val)
    # drawn from another random stream: no val image is byte-identical to the first training image
    first = (train_img.positive.image or train_img.query.image).tobytes()
    assert all(ex.positive.image.tobytes() != first for ex in val)
