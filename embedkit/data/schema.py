"""The sample schema shared by the demo data, MMEB conversion and every loader.

An ``Item`` is what gets embedded: text, an image, or both (MMEB text marks the image's place with
``<|image_1|>``). An ``Example`` is one training row: a query, its positive, K hard negatives and
the task it came from (task-homogeneous batching and per-task metrics key on it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Item:
    text: str | None = None
    image: Image.Image | None = None

    def __post_init__(self):
        if self.text is None and self.image is None:
            raise ValueError("an Item needs text, an image, or both")


@dataclass
class Example:
    query: Item
    positive: Item
    negatives: list[Item] = field(default_factory=list)
    task: str = "default"
    #: one score per negative where they were mined (``embedkit mine``: the judge's score), else None
    negative_scores: list[float] | None = None


def content_key(item: Item) -> int:
    """A 63-bit hash of what an item shows: its text and its image's pixels (mode, size, bytes).

    Two items with the same text and the same image content get the same key whatever objects or
    files they came from; in-batch false-negative masking (``train.mask_duplicates``) and mining's
    duplicate filter compare these keys, never object identity.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(b"T" + item.text.encode("utf-8") if item.text is not None else b"-")
    h.update(b"\0")
    if item.image is not None:
        image = item.image
        h.update(f"I{image.mode}{image.size[0]}x{image.size[1]}".encode())
        h.update(image.tobytes())
    return int.from_bytes(h.digest(), "little") >> 1  # fits a signed int64 tensor
