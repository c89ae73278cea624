"""The video and visual-document demos' examples and shards (``data.demo.kind`` = ``video`` | ``docs``).

``video``: caption -> clip examples (task ``demo_t2v``; ``demo_video.draw_clip`` frames as
``Item(text, video=Frames)``). Validation holds whole groups of motion partners (the four directions of
one object, the two motions of one pair: clips a single frame cannot tell apart), every held-out
caption's group included, so text-to-video R@1 among them needs the motion. ``first_frame_only``
replaces every frame by the first (same frame count, same tokens): the no-motion baseline.

``docs``: query -> page examples (task ``demo_docs``; ``demo_docs.draw_page``). ``holdout_combinations``
page specs never occur in training; the validation corpus is ``val_size`` pages of distinct specs (the
held-out ones included), each with one query, and each query is graded against every page of the
corpus (``demo_docs.grade``: 2, 1 or 0). The held-out shard carries what NDCG needs in each sample's
JSON (docs/demos.md): ``"doc_id"``, the id of the sample's positive page, and ``"qrels"``, ``{doc_id:
grade}`` for the pages of grade > 0; the corpus is the positives of the held-out samples.

Everything is deterministic in ``data.demo.seed``; shards are drawn once into a cache folder keyed by
the parameters (``demo.write_demo_shards``).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from embedkit.data import demo, demo_docs, demo_video
from embedkit.data.schema import Example, Item

FORMAT_VERSION = 1  # bump when drawing, captions or the sample JSON change: the cache key includes it
#: words of the clips' captions and the pages' queries that the image demo's vocabulary lacks
#: (``backbones.processors.tiny_vocabulary`` appends them, so the image demo's token ids stay as they were)
WORDS = ("moving", "up", "down", "apart", "together", "page", "table", "columns")
#: the ``data.demo`` keys each kind's drawing depends on (its cache key)
KEYED = {
    "video": ("scenes", "train_size", "val_size", "image_size", "holdout_combinations", "seed", "num_frames",
              "first_frame_only"),
    "docs": ("train_size", "val_size", "image_size", "holdout_combinations", "seed"),
}


def ensure_shards(p: dict, log=print) -> Path:
    """The shard folder of the ``data.demo`` section ``p``: ``<task>/train-*.tar`` and ``val-000000.tar``,
    drawn on first use (the image demo's for ``kind: scenes``)."""
    from embedkit.data.shards import encode_example

    kind = p.get("kind", "scenes")
    if kind == "scenes":
        return demo.ensure_demo_shards(p, log)
    if kind == "video":
        train, val = (lambda: video_train_examples(p, 0, p["train_size"])), video_val_examples
    else:
        train, val = (lambda: docs_train_examples(p, 0, p["train_size"])), docs_val_examples

    def val_samples() -> list[dict]:
        return [_with_extras(encode_example(ex, f"{i:08d}"), f"{i:08d}", extra)
                for i, (ex, extra) in enumerate(val(p))]

    return demo.write_demo_shards(cache_root(p), p, train, val_samples, log)


def cache_root(p: dict) -> Path:
    """``<cache>/demo_<kind>/<digest of the drawing's keys>``."""
    keyed = {k: p[k] for k in KEYED[p["kind"]]}
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, keyed], sort_keys=True).encode()).hexdigest()[:12]
    return demo.cache_base(p) / f"demo_{p['kind']}" / digest


def _with_extras(files: dict, key: str, extra: dict) -> dict:
    """A sample's members with ``extra`` fields added to its JSON."""
    if extra:
        meta = json.loads(files[f"{key}.json"])
        files[f"{key}.json"] = json.dumps({**meta, **extra}).encode()
    return files


# -- video --------------------------------------------------------------------------------------
def _video_scenes(p: dict) -> str:
    return "all" if p["scenes"] == "mixed" else p["scenes"]


def clip_item(combo: tuple, rng: random.Random, p: dict) -> Item:
    """A drawn clip of ``combo`` as a video item (frames at ``demo_video.FPS``); ``first_frame_only``:
    the first frame, ``num_frames`` times."""
    from embedkit.data.video import FramePolicy, frames_from_images

    frames, stamps = demo_video.draw_clip(combo, rng, p["image_size"], p["num_frames"])
    if p["first_frame_only"]:
        frames = [frames[0]] * len(frames)
    return Item(video=frames_from_images(frames, stamps, FramePolicy(num_frames=len(frames))))


def _clip_example(combo: tuple, rng: random.Random, p: dict) -> Example:
    return Example(query=Item(text=demo_video.clip_caption(combo)), positive=clip_item(combo, rng, p), task="demo_t2v")


def video_train_examples(p: dict, start: int, stop: int):
    """Training examples ``start..stop``; example i depends only on (seed, i)."""
    train, _ = demo_video.split_combinations(_video_scenes(p), p["holdout_combinations"], p["seed"])
    for i in range(start, stop):
        rng = random.Random(f"video-train-{p['seed']}-{i}")
        yield _clip_example(train[rng.randrange(len(train))], rng, p)


def video_val_examples(p: dict) -> list[tuple[Example, dict]]:
    """Held-out caption -> clip examples (fresh draws), whole motion-partner groups: every held-out
    caption's group first, then random other groups, as many whole groups as fit in ``val_size``."""
    _, held = demo_video.split_combinations(_video_scenes(p), p["holdout_combinations"], p["seed"])
    rng = random.Random(f"video-val-{p['seed']}")
    groups = _partner_groups(held) + _partner_groups(rng.sample(demo_video.combinations(_video_scenes(p)),
                                                                len(demo_video.combinations(_video_scenes(p)))))
    chosen: list[tuple] = []
    for group in groups:
        if len(chosen) + len(group) <= p["val_size"]:
            chosen += group
    if len(chosen) < 2:
        raise ValueError(f"data.demo.val_size={p['val_size']} holds no two whole motion-partner groups' clips")
    rng.shuffle(chosen)
    return [(_clip_example(c, rng, p), {}) for c in chosen]


def _partner_groups(combos: list[tuple]) -> list[list[tuple]]:
    """The distinct motion-partner groups of ``combos``, in order of first appearance."""
    seen, out = set(), []
    for c in combos:
        group = demo_video.motion_partners(c)
        if group[0] not in seen:
            seen.add(group[0])
            out.append(group)
    return out


# -- documents ----------------------------------------------------------------------------------
def split_specs(holdout: int, seed: int) -> tuple[list, list]:
    """(training page specs, ``holdout`` specs never drawn in training), fixed by ``seed``."""
    specs = demo_docs.all_specs()
    if not 0 <= holdout < len(specs):
        raise ValueError(f"data.demo.holdout_combinations={holdout} must be in [0, {len(specs)}) for kind=docs")
    held = set(random.Random(f"docs-holdout-{seed}").sample(range(len(specs)), holdout))
    return [s for i, s in enumerate(specs) if i not in held], [s for i, s in enumerate(specs) if i in held]


def _page_example(spec, rng: random.Random, size: int) -> Example:
    query = rng.choice(demo_docs.page_queries(spec))
    return Example(query=Item(text=query), positive=Item(image=demo_docs.draw_page(spec, rng, size)), task="demo_docs")


def docs_train_examples(p: dict, start: int, stop: int):
    """Training examples ``start..stop``: a query and the page it was made from; i depends only on (seed, i)."""
    train, _ = split_specs(p["holdout_combinations"], p["seed"])
    for i in range(start, stop):
        rng = random.Random(f"docs-train-{p['seed']}-{i}")
        yield _page_example(train[rng.randrange(len(train))], rng, p["image_size"])


def docs_val_examples(p: dict) -> list[tuple[Example, dict]]:
    """The held-out corpus: ``val_size`` pages of distinct specs (every held-out spec first), each with
    one query, and the extras ``{"doc_id": ..., "qrels": {doc_id: grade > 0}}`` of each."""
    train, held = split_specs(p["holdout_combinations"], p["seed"])
    n = p["val_size"]
    if not 1 <= n <= len(train) + len(held):
        raise ValueError(f"data.demo.val_size={n} must be in [1, {len(train) + len(held)}] (distinct pages)")
    rng = random.Random(f"docs-val-{p['seed']}")
    specs = (held + rng.sample(train, len(train)))[:n]
    rng.shuffle(specs)
    ids = [f"page-{j:05d}" for j in range(n)]
    out = []
    for j, spec in enumerate(specs):
        graded = {ids[k]: g for k, s in enumerate(specs) if (g := demo_docs.grade(spec, s)) > 0}
        out.append((_page_example(spec, rng, p["image_size"]), {"doc_id": ids[j], "qrels": graded}))
    return out
