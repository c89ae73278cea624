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
