"""The sample schema shared by the demo data, MMEB conversion and every loader.

An ``Item`` is what gets embedded: text, an image, or both (MMEB text marks the image's place with
``<|image_1|>``). An ``Example`` is one training row: a query, its positive, K hard negatives and
the task it came from (task-homogeneous batching and per-task metrics key on it).
"""

from __future__ import annotations

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
