"""Video demo clips: deterministic, moving the captioned way, first frames that do not tell the motion."""

import random

import numpy as np
import pytest

from embedkit.data import demo_video as dv
from embedkit.data.demo import COLOURS
from embedkit.errors import UserError


def _arrays(frames):
    return [np.asarray(f, dtype=np.int16) for f in frames]


def _centroid(frame, colour):
    """(x, y) mean of the pixels within 30 of ``colour`` on every channel (measured, not the drawn centre)."""
    mask = (np.abs(np.asarray(frame, dtype=np.int16) - np.array(COLOURS[colour])) <= 30).all(axis=-1)
    ys, xs = np.nonzero(mask)
    assert len(xs) > 10, "the shape is not visible"
    return xs.mean(), ys.mean()


def test_same_rng_same_clip_other_rng_other_clip():
    combo = ("red", "circle", "left")
    a, ta = dv.draw_clip(combo, random.Random(1), 64, 6)
    b, tb = dv.draw_clip(combo, random.Random(1), 64, 6)
    c, _ = dv.draw_clip(combo, random.Random(2), 64, 6)
    assert all((x == y).all() for x, y in zip(_arrays(a), _arrays(b))) and ta == tb
    assert any((x != y).any() for x, y in zip(_arrays(a), _arrays(c)))


@pytest.mark.parametrize("size,n", [(64, 8), (96, 4), (128, 2)])
def test_sizes_modes_timestamps(size, n):
    frames, ts = dv.draw_clip(("blue", "square", "up"), random.Random(0), size, n)
    assert len(frames) == n and all(f.size == (size, size) and f.mode == "RGB" for f in frames)
    assert ts == [i / dv.FPS for i in range(n)]


def test_frames_differ_over_time():
    for combo in [("green", "diamond", "down"), (("red", "circle"), ("blue", "square"), "together")]:
        arr = _arrays(dv.draw_clip(combo, random.Random(3), 64, 8)[0])
        assert all((arr[i] != arr[i + 1]).any() for i in range(len(arr) - 1))


@pytest.mark.parametrize("direction", list(dv.DIRECTIONS))
def test_single_object_moves_the_captioned_way(direction):
    want = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]  # image y grows down
    for seed in range(5):
        frames, _ = dv.draw_clip(("purple", "cross", direction), random.Random(seed), 64, 8)
        (x0, y0), (x1, y1) = _centroid(frames[0], "purple"), _centroid(frames[-1], "purple")
        moved = (x1 - x0, y1 - y0)
        main = 0 if want[0] else 1
        assert moved[main] * want[main] > 8, (direction, moved)  # >= 8 px of a 64 px frame, the right sign
        assert abs(moved[1 - main]) < 1.5


@pytest.mark.parametrize("motion", dv.PAIR_MOTIONS)
def test_pair_moves_apart_or_together(motion):
    for seed in range(5):
        frames, _ = dv.draw_clip((("red", "circle"), ("blue", "square"), motion), random.Random(seed), 64, 8)
        gap = [abs(_centroid(f, "red")[0] - _centroid(f, "blue")[0]) for f in (frames[0], frames[-1])]
        assert (gap[1] - gap[0] > 8) if motion == "apart" else (gap[0] - gap[1] > 8), gap


def test_motion_partners_share_the_first_frame_but_not_the_last():
    for combo in [("yellow", "triangle", "left"), (("black", "cross"), ("green", "circle"), "apart")]:
        partners = dv.motion_partners(combo)
        assert combo in partners and len({dv.clip_caption(p) for p in partners}) == len(partners) >= 2
        for seed in range(3):
            clips = [_arrays(dv.draw_clip(p, random.Random(seed), 64, 5)[0]) for p in partners]
            assert all((c[0] == clips[0][0]).all() for c in clips)
            lasts = [c[-1].tobytes() for c in clips]
            assert len(set(lasts)) == len(lasts)


def test_captions_and_combinations():
    assert dv.clip_caption(("red", "circle", "left")) == "a red circle moving left"
    assert dv.clip_caption((("red", "circle"), ("blue", "square"), "apart")) == \
        "a red circle and a blue square moving apart"
    singles, pairs = dv.combinations("single"), dv.combinations("pair")
    assert len(singles) == 6 * 5 * 4 and len(pairs) == 30 * 29 // 2 * 2
    assert dv.combinations("all") == singles + pairs
    captions = [dv.clip_caption(c) for c in singles + pairs]
    assert len(set(captions)) == len(captions)
    # every caption's partners are combinations too: the first frame never answers alone
    assert all(set(dv.motion_partners(c)) <= set(singles + pairs) for c in singles + pairs)


def test_holdout_split_is_disjoint_fixed_by_seed():
    train, held = dv.split_combinations("single", 10, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and len(train) + 10 == 120
    assert dv.split_combinations("single", 10, seed=3) == (train, held)
    assert dv.split_combinations("single", 10, seed=4)[1] != held


@pytest.mark.parametrize("call,msg", [
    (lambda: dv.draw_clip(("red", "circle", "left"), random.Random(0), 64, 1), "at least 2 frames"),
    (lambda: dv.draw_clip(("red", "circle", "left"), random.Random(0), 8, 4), "frame size"),
    (lambda: dv.combinations("many"), "single, pair or all"),
    (lambda: dv.split_combinations("single", 120, 0), "holdout=120"),
])
def test_bad_input_is_one_line_error(call, msg):
    with pytest.raises(UserError, match=msg) as e:
        call()
    assert "\n" not in str(e.value)


# -- the video demo's examples, held-out groups and shards (data/demo_visual.py, datamodule.HeldOut) -----
VIDEO = {"enabled": True, "kind": "video", "scenes": "single", "train_size": 4, "val_size": 10, "image_size": 32,
         "holdout_combinations": 3, "seed": 5, "cache_dir": None, "text_only": False, "num_frames": 4,
         "first_frame_only": False}


def test_clip_items_are_videos_and_first_frame_only_freezes_them():
    from embedkit.data import demo_visual

    combo = ("red", "circle", "left")
    moving = demo_visual.clip_item(combo, random.Random(1), VIDEO)
    still = demo_visual.clip_item(combo, random.Random(1), {**VIDEO, "first_frame_only": True})
    assert moving.video is not None and not moving.images and len(moving.video.images) == 4
    assert moving.video.timestamps == [i / dv.FPS for i in range(4)]
    first = moving.video.images[0].tobytes()
    assert still.video.images[0].tobytes() == first and len(still.video.images) == 4
    assert all(f.tobytes() == first for f in still.video.images)
    assert moving.video.images[-1].tobytes() != first


def test_video_training_never_shows_a_held_out_caption():
    from embedkit.data import demo_visual

    _, held = dv.split_combinations("single", 3, 5)
    held_captions = {dv.clip_caption(c) for c in held}
    examples = list(demo_visual.video_train_examples({**VIDEO, "num_frames": 2}, 0, 200))
    assert all(ex.task == "demo_t2v" and ex.positive.video is not None for ex in examples)
    assert not {ex.query.text for ex in examples} & held_captions


def test_video_validation_holds_whole_motion_partner_groups():
    from embedkit.data import demo_visual

    _, held = dv.split_combinations("single", 3, 5)
    val = demo_visual.video_val_examples(VIDEO)
    captions = [ex.query.text for ex, _ in val]
    assert len(val) == 8 and len(set(captions)) == 8  # two whole groups of 4 fit in 10
    for c in captions:  # every caption's partners are there: one frame cannot pick among them
        combo = next(k for k in dv.combinations("single") if dv.clip_caption(k) == c)
        assert {dv.clip_caption(p) for p in dv.motion_partners(combo)} <= set(captions)
    assert {dv.clip_caption(c) for c in held[:2]} <= set(captions)  # the held-out captions' groups first
    assert [ex.query.text for ex, _ in demo_visual.video_val_examples(VIDEO)] == captions
    with pytest.raises(ValueError, match="val_size=3"):
        demo_visual.video_val_examples({**VIDEO, "val_size": 3})


def test_video_shards_read_back_as_text_to_video(tmp_path):
    from embedkit.data import demo_visual
    from embedkit.data.datamodule import HeldOut, read_samples

    p = {**VIDEO, "cache_dir": str(tmp_path), "val_size": 4}
    root = demo_visual.ensure_shards(p, log=lambda m: None)
    assert root.parent.name == "demo_video" and (root / "demo_t2v" / "train-000000.tar").is_file()
    samples = read_samples([str(root / "val-000000.tar")], 100)
    want = demo_visual.video_val_examples(p)
    assert [ex.query.text for ex, _ in samples] == [ex.query.text for ex, _ in want]
    got, drawn = samples[0][0].positive.video, want[0][0].positive.video
    assert [f.tobytes() for f in got.images] == [f.tobytes() for f in drawn.images]
    held = HeldOut.of(samples)
    assert held.metric == "t2v_r@1" and held.qrels is None
    # the cache key follows the drawing: the baseline's clips are another folder
    assert demo_visual.cache_root({**p, "first_frame_only": True}) != root


def test_the_image_demo_keeps_its_cache_key():
    from embedkit.data import demo, demo_visual

    p = {**VIDEO, "kind": "scenes", "image_size": 56, "holdout_combinations": 10, "cache_dir": "/c"}
    root = demo.cache_root(p)
    assert root == demo.cache_root({**p, "num_frames": 9, "first_frame_only": True, "kind": "video"})
    assert root.parent.name == "demo" and demo_visual.cache_root({**p, "kind": "video"}).parent.name == "demo_video"


def test_the_tiny_tokenizer_tells_every_motion_and_page_word_apart():
    from embedkit.backbones.processors import tiny_tokenizer
    from embedkit.data import demo_visual

    tok = tiny_tokenizer([], pad="<pad>", eos="<eos>")
    unk = tok.convert_tokens_to_ids("<unk>")
    words = [w for c in dv.combinations("all") for w in dv.clip_caption(c).split()]
    words += "a page with a table of 3 columns above below".split()
    assert unk not in tok(" ".join(words))["input_ids"]
    vocab = tok.get_vocab()
    assert all(vocab[w] >= len(vocab) - len(demo_visual.WORDS) for w in demo_visual.WORDS)  # appended last
