"""Procedurally drawn scenes for the demo: coloured shapes at places, with captions.

Scenes hold one object ("a red circle at the top left") or two ("a red circle above a blue
square"), with jittered size, place and background. Examples go both ways: caption -> image
(task ``demo_t2i``) and image -> caption (``demo_i2t``).

Splits: ``train`` draws from every caption combination except ``holdout_combinations`` of them;
``val`` is fresh draws (another random stream) whose captions are unique among the split, and it
includes every held-out combination, so validation also measures composition never seen in
training. Everything is deterministic in the data seed. Shards are generated on first use into a
cache folder keyed by the parameters, and the folder appears atomically (rename) when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from embedkit.data.schema import Example, Item

COLOURS = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (40, 70, 225),
    "yellow": (235, 205, 20),
    "purple": (140, 50, 180),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLACES = {  # name -> centre as a fraction of the canvas
    "at the top left": (0.27, 0.27),
    "at the top right": (0.73, 0.27),
    "at the bottom left": (0.27, 0.73),
    "at the bottom right": (0.73, 0.73),
    "in the centre": (0.5, 0.5),
}
RELATIONS = ("above", "below", "left of", "right of")
INVERSE = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
DEMO_WORDS = sorted(
    {w for name in list(COLOURS) + list(SHAPES) + list(PLACES) + list(RELATIONS) for w in name.split()}
    | {"a"}
)
SHARD_SIZE = 1000
FORMAT_VERSION = 4  # bump when drawing or captions change: the cache key includes it


def single_combinations() -> list[tuple]:
    return [(c, s, p) for c in COLOURS for s in SHAPES for p in PLACES]


def pair_combinations() -> list[tuple]:
    objs = [(c, s) for c in COLOURS for s in SHAPES]
    return [(a, r, b) for a in objs for r in RELATIONS for b in objs if a != b]


def caption(combo: tuple) -> str:
    if len(combo) == 3 and isinstance(combo[0], str):
        colour, shape, place = combo
        return f"a {colour} {shape} {place}"
    (c1, s1), rel, (c2, s2) = combo
    return f"a {c1} {s1} {rel} a {c2} {s2}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r / 4  # thin arms: a thick cross and a diamond look alike at 56 px (docs/bugs-and-fixes.md)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def draw_scene(combo: tuple, rng: random.Random, size: int) -> Image.Image:
    """One image of ``combo`` with jittered background, size and place."""
    bg = tuple(rng.randint(215, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    jitter = 0.06 * size
    if isinstance(combo[0], str):
        colour, shape, place = combo
        fx, fy = PLACES[place]
        r = rng.uniform(0.14, 0.2) * size
        cx, cy = fx * size + rng.uniform(-jitter, jitter), fy * size + rng.uniform(-jitter, jitter)
        _draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
        return img
    (c1, s1), rel, (c2, s2) = combo
    r1, r2 = (rng.uniform(0.11, 0.15) * size for _ in range(2))
    near, far = 0.27 * size, 0.73 * size
    along = rng.uniform(0.3, 0.7) * size
    first, second = (near, far) if rel in ("above", "left of") else (far, near)
    first += rng.uniform(-jitter, jitter)
    second += rng.uniform(-jitter, jitter)
    across1, across2 = along + rng.uniform(-jitter, jitter), along + rng.uniform(-jitter, jitter)
    if rel in ("above", "below"):
        p1, p2 = (across1, first), (across2, second)
    else:
        p1, p2 = (first, across1), (second, across2)
    _draw_shape(draw, s1, *p1, r1, COLOURS[c1])
    _draw_shape(draw, s2, *p2, r2, COLOURS[c2])
    return img


def _combinations(scenes: str) -> list[tuple]:
    if scenes == "single":
        return single_combinations()
    if scenes == "pair":
        return pair_combinations()
    return single_combinations() + pair_combinations()


def scene_key(combo: tuple) -> tuple:
    """Captions of the same scene share a key: "A above B" is "B below A"."""
    if len(combo) == 3 and isinstance(combo[0], str):
        return combo
    a, rel, b = combo
    return combo if rel in ("above", "left of") else (b, INVERSE[rel], a)


def _scenes(combos: list[tuple]) -> dict[tuple, list[tuple]]:
    """scene key -> its captions' combinations, in order of first appearance."""
    out: dict[tuple, list[tuple]] = {}
    for c in combos:
        out.setdefault(scene_key(c), []).append(c)
    return out


def split_combinations(scenes: str, holdout: int, seed: int) -> tuple[list[tuple], list[tuple]]:
    """(training combinations, held-out combinations whose scene never occurs in training).

    Held out by scene, not by caption: with "A above B" held out, "B below A" is held out too (one
    phrasing is validated).
    """
    by_scene = _scenes(_combinations(scenes))
    keys = list(by_scene)
    rng = random.Random(f"holdout-{seed}")
    held = {keys[i] for i in rng.sample(range(len(keys)), holdout)}
    train = [c for k in keys if k not in held for c in by_scene[k]]
    return train, [by_scene[k][0] for k in keys if k in held]


def make_example(combo: tuple, rng: random.Random, size: int, reverse: bool, text_only: bool) -> Example:
    text = caption(combo)
    if text_only:  # for text-only backbones: the "image" side is the caption said another way
        target = Item(text=f"{text} .")
    else:
        target = Item(image=draw_scene(combo, rng, size))
    query = Item(text=text)
    if reverse:
        return Example(query=target, positive=query, task="demo_i2t")
    return Example(query=query, positive=target, task="demo_t2i")


def train_examples(p: dict, start: int, stop: int):
    """Training examples ``start..stop`` of the stream; example i depends only on (seed, i)."""
    train_combos, _ = split_combinations(p["scenes"], p["holdout_combinations"], p["seed"])
    for i in range(start, stop):
        rng = random.Random(f"train-{p['seed']}-{i}")
        combo = train_combos[rng.randrange(len(train_combos))]
        yield make_example(combo, rng, p["image_size"], reverse=rng.random() < 0.5, text_only=p["text_only"])


def val_examples(p: dict) -> list[Example]:
    """Held-out caption -> image examples: fresh draws, scenes unique, all held-out scenes in."""
    train_combos, held = split_combinations(p["scenes"], p["holdout_combinations"], p["seed"])
    n = p["val_size"]
    rng = random.Random(f"val-{p['seed']}")
    # one caption per scene: two phrasings of one scene would make each other's negative
    by_scene = list(_scenes(train_combos).values())
    if n > len(by_scene) + len(held):
        raise ValueError(f"data.demo.val_size={n} exceeds the {len(by_scene) + len(held)} distinct scenes")
    picked = rng.sample(by_scene, max(0, n - len(held)))
    # no draw for a single phrasing: single-object validation stays what it was before scene keys
    chosen = held[:n] + [ph[0] if len(ph) == 1 else rng.choice(ph) for ph in picked]
    rng.shuffle(chosen)
    return [make_example(c, rng, p["image_size"], reverse=False, text_only=p["text_only"]) for c in chosen]


def held_out_captions(p: dict) -> set[str]:
    return {caption(c) for c in split_combinations(p["scenes"], p["holdout_combinations"], p["seed"])[1]}


def cache_base(p: dict) -> Path:
    """The folder of every demo's drawn data: ``data.demo.cache_dir``, ``$EMBEDKIT_CACHE`` or ``~/.cache/embedkit``."""
    return Path(p.get("cache_dir") or os.environ.get("EMBEDKIT_CACHE") or Path.home() / ".cache" / "embedkit").expanduser()


def cache_root(p: dict) -> Path:
    keyed = {k: p[k] for k in ("scenes", "train_size", "val_size", "image_size", "holdout_combinations", "seed", "text_only")}
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, keyed], sort_keys=True).encode()).hexdigest()[:12]
    return cache_base(p) / "demo" / digest


def ensure_demo_shards(p: dict, log=print) -> Path:
    """The demo's shard folder (``demo_t2i/train-*.tar``, ``demo_i2t/train-*.tar``, ``val-000000.tar``),
    generated on first use."""
    from embedkit.data.shards import encode_example

    def val_samples() -> list[dict]:
        return [encode_example(ex, f"{i:08d}") for i, ex in enumerate(val_examples(p))]

    return write_demo_shards(cache_root(p), p, lambda: train_examples(p, 0, p["train_size"]), val_samples, log)


def write_demo_shards(root: Path, p: dict, train, val_samples, log=print) -> Path:
    """``root``, written once (atomically: a temporary folder renamed) unless it is complete already.

    ``train()`` yields the training ``Example``s, written into one folder of shards per task
    (``<task>/train-*.tar``); ``val_samples()`` returns the held-out samples as shard members
    (``shards.encode_example``'s dicts, extra JSON fields allowed), written into ``val-000000.tar``;
    ``p`` (the ``data.demo`` section) goes into ``done.json``."""
    from embedkit.data.shards import encode_example, write_shard

    if (root / "done.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
    log(f"drawing demo data ({p['train_size']} training examples, {p['val_size']} held out) into {root}")
    try:
        # one folder per task, like MMEB's subsets: task-homogeneous batching keys on the folder
        pending: dict[str, list] = {}
        written: dict[str, int] = {}

        def flush(task: str) -> None:
            n = written.get(task, 0)
            write_shard(tmp / task / f"train-{n:06d}.tar", pending.pop(task))
            written[task] = n + 1

        for i, ex in enumerate(train()):
            pending.setdefault(ex.task, []).append(encode_example(ex, f"{i:08d}"))
            if len(pending[ex.task]) == SHARD_SIZE:
                flush(ex.task)
        for task in list(pending):
            flush(task)
        write_shard(tmp / "val-000000.tar", val_samples())
        (tmp / "done.json").write_text(json.dumps(p, sort_keys=True))
        try:
            os.rename(tmp, root)
        except OSError:  # another process (a DDP rank) finished first: theirs is identical
            if not (root / "done.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
