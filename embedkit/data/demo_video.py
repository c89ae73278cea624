"""Procedurally drawn clips for the video demo: coloured shapes that move, with captions.

A clip holds one object moving one way ("a red circle moving left") or two objects moving
horizontally apart or together ("a red circle and a blue square moving apart"). Colours and shapes
are the image demo's (``embedkit.data.demo``), and so is the drawing of a shape.

The motion argument: a single frame must not answer the caption, or the demo measures image
retrieval, not video. So every caption has partners whose clips start from the *same* first-frame
distribution: the four directions of one object, and "apart"/"together" of one pair of objects. The
random numbers a clip draws (background, size, start, speed, which object is on top) are drawn in the
same order whatever the motion, so the same ``rng`` state gives the same first frame; only later
frames tell the captions apart. Everything is deterministic in the ``rng`` passed in.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from embedkit.data.demo import COLOURS, SHAPES, _draw_shape
from embedkit.errors import UserError

DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
PAIR_MOTIONS = ("apart", "together")
#: frames per second of the drawn clips: timestamps are i / FPS seconds
FPS = 4.0
MIN_SIZE, MAX_SIZE = 32, 512


def single_combinations() -> list[tuple]:
    """(colour, shape, direction) for every colour, shape and direction: 6 x 5 x 4 = 120."""
    return [(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


def pair_combinations() -> list[tuple]:
    """((colour, shape), (colour, shape), motion), each unordered pair of distinct objects once."""
    objs = [(c, s) for c in COLOURS for s in SHAPES]
    return [(a, b, m) for i, a in enumerate(objs) for b in objs[i + 1:] for m in PAIR_MOTIONS]


def combinations(scenes: str = "all") -> list[tuple]:
    """Caption combinations of ``scenes``: ``single``, ``pair`` or ``all`` (singles then pairs)."""
    if scenes not in ("single", "pair", "all"):
        raise UserError(f"video demo scenes must be single, pair or all, got {scenes!r}")
    return (single_combinations() if scenes != "pair" else []) + (pair_combinations() if scenes != "single" else [])


def _is_single(combo: tuple) -> bool:
    return isinstance(combo[0], str)


def clip_caption(combo: tuple) -> str:
    """The caption of a combination: "a red circle moving left", "a red circle and a blue square moving apart"."""
    if _is_single(combo):
        colour, shape, direction = combo
        return f"a {colour} {shape} moving {direction}"
    (c1, s1), (c2, s2), motion = combo
    return f"a {c1} {s1} and a {c2} {s2} moving {motion}"


def motion_partners(combo: tuple) -> list[tuple]:
    """The combinations whose clips share ``combo``'s first-frame distribution (``combo`` included)."""
    if _is_single(combo):
        return [(combo[0], combo[1], d) for d in DIRECTIONS]
    return [(combo[0], combo[1], m) for m in PAIR_MOTIONS]


def split_combinations(scenes: str, holdout: int, seed: int) -> tuple[list[tuple], list[tuple]]:
    """(training combinations, ``holdout`` held-out ones), a draw fixed by ``seed``.

    Held out by caption: "a red circle moving left" may be held out while "... moving right" is
    trained on, so validation measures a colour-shape-motion composition never seen in training."""
    combos = combinations(scenes)
    if not 0 <= holdout < len(combos):
        raise UserError(f"video demo holdout={holdout} must be in [0, {len(combos)}) for scenes={scenes!r}")
    held_idx = set(random.Random(f"video-holdout-{seed}").sample(range(len(combos)), holdout))
    return [c for i, c in enumerate(combos) if i not in held_idx], [c for i, c in enumerate(combos) if i in held_idx]


def _check(size: int, num_frames: int) -> None:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"video demo frame size must be in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size}")
    if num_frames < 2:
        raise UserError(f"video demo clips need at least 2 frames to show motion, got num_frames={num_frames}")


def _single_tracks(rng: random.Random, size: int, direction: str) -> list[tuple]:
    """[(start (x, y), step per clip (dx, dy), radius)]: starts near the centre, travels ~1/4 canvas."""
    r = rng.uniform(0.10, 0.13) * size
    jitter = 0.08 * size
    start = (0.5 * size + rng.uniform(-jitter, jitter), 0.5 * size + rng.uniform(-jitter, jitter))
    travel = rng.uniform(0.22, 0.27) * size
    dx, dy = DIRECTIONS[direction]
    return [(start, (dx * travel, dy * travel), r)]


def _pair_tracks(rng: random.Random, size: int, motion: str) -> list[tuple]:
    """Two objects in rows 0.3 canvas apart (never overlap), moving horizontally apart or together."""
    r1, r2 = (rng.uniform(0.08, 0.1) * size for _ in range(2))
    x1, x2 = rng.uniform(0.3, 0.4) * size, rng.uniform(0.6, 0.7) * size
    rows = [rng.uniform(0.3, 0.36) * size, rng.uniform(0.64, 0.7) * size]
    if rng.random() < 0.5:  # which object is on top: drawn, so "the first named is on top" is no cue
        rows.reverse()
    travel = rng.uniform(0.1, 0.12) * size
    sign = 1.0 if motion == "apart" else -1.0
    return [((x1, rows[0]), (-sign * travel, 0.0), r1), ((x2, rows[1]), (sign * travel, 0.0), r2)]


def draw_clip(combo: tuple, rng: random.Random, size: int = 64, num_frames: int = 8) -> tuple[list, list[float]]:
    """``num_frames`` RGB ``size`` x ``size`` frames of ``combo`` and their timestamps (i / FPS seconds).

    The objects move linearly from their start (frame 0) by their travel (last frame); the background
    is one jittered light colour for the whole clip. Same ``rng`` state and same colours/shapes -> same
    first frame whatever the motion (module docstring)."""
    _check(size, num_frames)
    bg = tuple(rng.randint(215, 255) for _ in range(3))
    if _is_single(combo):
        colour, shape, direction = combo
        objects, tracks = [(colour, shape)], _single_tracks(rng, size, direction)
    else:
        a, b, motion = combo
        objects, tracks = [a, b], _pair_tracks(rng, size, motion)
    frames = [_frame(objects, tracks, bg, size, i / (num_frames - 1)) for i in range(num_frames)]
    return frames, [i / FPS for i in range(num_frames)]


def _frame(objects: list, tracks: list, bg: tuple, size: int, t: float) -> Image.Image:
    """One frame at clip fraction ``t`` in [0, 1]."""
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for (colour, shape), ((x, y), (dx, dy), r) in zip(objects, tracks):
        _draw_shape(draw, shape, x + t * dx, y + t * dy, r, COLOURS[colour])
    return img
