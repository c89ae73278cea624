"""Test images of any size, not uniform (so patches differ), drawn from a seed."""

from __future__ import annotations

import random

from PIL import Image


def speckled_image(w: int, h: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), (rng.randrange(256), 40, 40))
    for x in range(0, w, 3):
        img.putpixel((x, rng.randrange(h)), (x % 256, rng.randrange(256), 200))
    return img
