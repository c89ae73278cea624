"""The sample schema shared by the demo data, MMEB conversion and every loader.

An ``Item`` is what gets embedded: text, and any number of images or one video (its sampled frames,
``Frames``, made by ``data.video``). MMEB text marks where each visual goes: ``<|image_1|>`` ... ``<|image_k|>``
for images and ``<|video_1|>`` for the video; text without them gets the visuals in front, in order
(``segments`` is the one reading of that grammar; each backbone swaps in its own tokens). An
``Example`` is one training row: a query, its positive, K hard negatives and the task it came from
(task-homogeneous batching and per-task metrics key on it).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image

VIDEO_PLACEHOLDER = "<|video_1|>"
_PLACEHOLDER = re.compile(r"<\|(image|video)_(\d+)\|>")


@dataclass
class Frames:
    """A video's frames as a policy kept them (``data.video``): RGB images, their timestamps in seconds
    (PTS x time_base for a video, None for a stream without PTS such as raw H.264; as given, or None,
    for a list), their indices in the source, the source's frame count and its duration in seconds
    (None when unknown)."""

    images: list[Image.Image]
    timestamps: list[float] | None
    indices: list[int]
    source_frames: int
    duration: float | None = None


def image_placeholder(k: int) -> str:
    """MMEB's placeholder of the k-th image (1-based): ``<|image_1|>``."""
    return f"<|image_{k}|>"


@dataclass(init=False)
class Item:
    """Text and an ordered tuple of images, or text and a video; at least one of them.

    ``Item(text, image)`` (one image) is the same as ``Item(text, images=(image,))``. ``item.image`` is
    that one image (None without images); on an item with several images or a video it raises, so code
    written for one image cannot silently drop the rest.
    """

    text: str | None
    images: tuple[Image.Image, ...]
    video: Frames | None

    def __init__(self, text: str | None = None, image: Image.Image | None = None, *,
                 images: Sequence[Image.Image] = (), video: Frames | None = None):
        if image is not None and images:
            raise ValueError("an Item takes image= or images=, not both")
        self.text = text
        self.images = (image,) if image is not None else tuple(images)
        self.video = video
        if self.video is not None and self.images:
            raise ValueError("an Item holds images or a video, not both")
        if self.video is not None and not self.video.images:
            raise ValueError("an Item's video has no frames")
        if self.text is None and not self.images and self.video is None:
            raise ValueError("an Item needs text, an image or a video")

    @property
    def image(self) -> Image.Image | None:
        if self.video is not None or len(self.images) > 1:
            raise ValueError(f"this item holds {_visuals(self)}; this code path takes one image")
        return self.images[0] if self.images else None

    @property
    def has_visual(self) -> bool:
        return bool(self.images) or self.video is not None


def _visuals(item: Item) -> str:
    if item.video is not None:
        return f"a video of {len(item.video.images)} frames"
    return f"{len(item.images)} images"


@dataclass
class TeacherArrays:
    """A teacher's data of one example (``embedkit teach``; ``data/shards.py`` stores it): ``embeddings``
    float16/32 numpy [2 + k, Dt] (query, positive, then the example's k negatives) and/or ``scores``
    float32 [1 + k] (a judge's scores of the positive, then of the k negatives). Either may be None."""

    embeddings: Any = None
    scores: Any = None


@dataclass
class Example:
    query: Item
    positive: Item
    negatives: list[Item] = field(default_factory=list)
    task: str = "default"
    #: one score per negative where they were mined (``embedkit mine``: the judge's score), else None
    negative_scores: list[float] | None = None
    #: the teacher's embeddings and/or judge scores where the shards were taught (``embedkit teach``), else None
    teacher: TeacherArrays | None = None


#: a segment of an item: ("text", str), ("image", k) with k the 0-based image index, or ("video", 0)
Segment = tuple[str, "str | int"]


def segments(item: Item) -> list[Segment]:
    """The item's text and visuals in reading order, for a backbone to turn into its tokens.

    Where the text has no placeholder the visuals lead it (images in order, or the video), as MMEB's
    single-image items are read. Where it has one, every visual of the item must appear exactly once
    (``<|image_1|>`` ... ``<|image_k|>``, or ``<|video_1|>``) and no other; ValueError (one line) else.
    A text-only item's text is taken as it is, placeholders and all (there is nothing to put there).
    Empty text pieces are dropped."""
    text = item.text or ""
    if not item.has_visual:
        return [("text", text)] if text else []
    wanted = [("video", 0)] if item.video is not None else [("image", k) for k in range(len(item.images))]
    found = list(_PLACEHOLDER.finditer(text))
    if not found:
        return [*wanted, *([("text", text)] if text else [])]
    out: list[Segment] = []
    seen: list[Segment] = []
    at = 0
    for m in found:
        kind, k = m.group(1), int(m.group(2)) - 1
        seg = (kind, k)
        if seg not in wanted or seg in seen:
            raise ValueError(f"the text's {m.group(0)} does not match the item's {_visuals(item)}"
                             + (" (it appears twice)" if seg in seen else ""))
        if m.start() > at:
            out.append(("text", text[at:m.start()]))
        out.append(seg)
        seen.append(seg)
        at = m.end()
    if at < len(text):
        out.append(("text", text[at:]))
    if len(seen) != len(wanted):
        missing = [image_placeholder(k + 1) if kind == "image" else VIDEO_PLACEHOLDER
                   for kind, k in wanted if (kind, k) not in seen]
        raise ValueError(f"the text places some of the item's {_visuals(item)} but not {', '.join(missing)}")
    return out


def content_key(item: Item) -> int:
    """A 63-bit hash of what an item shows: its text, every image's pixels (mode, size, bytes) in order, and a
    video's frames and their timestamps.

    Two items with the same text and the same visual content get the same key whatever objects or
    files they came from; in-batch false-negative masking (``train.mask_duplicates``) and mining's
    duplicate filter compare these keys, never object identity.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(b"T" + item.text.encode("utf-8") if item.text is not None else b"-")
    h.update(b"\0")
    for image in item.images:
        _hash_image(h, b"I", image)
    if item.video is not None:
        stamps = item.video.timestamps
        h.update(f"V{len(item.video.images)}:{stamps!r}".encode())
        for frame in item.video.images:
            _hash_image(h, b"F", frame)
    return int.from_bytes(h.digest(), "little") >> 1  # fits a signed int64 tensor


def _hash_image(h, tag: bytes, image: Image.Image) -> None:
    h.update(tag + f"{image.mode}{image.size[0]}x{image.size[1]}".encode())
    h.update(image.tobytes())
