"""Pixels every loader agrees on, and the reasons a sample is refused.

``to_rgb`` is the one conversion of a decoded image to what a backbone sees; ``open_image`` decodes an
image's bytes with PIL's decompression-bomb guard as a refusal (``image_too_large``) and an optional pixel
cap as a resize (aspect kept, ``fit``); ``BadSample`` carries a skip reason of ``SKIP_REASONS``. The
shard codec (``shards``) and the video decoder (``video``) both build on this module, which imports
neither.
"""

from __future__ import annotations

import io
import math
import warnings

from PIL import Image

#: why a sample is skipped (``SourceReader`` counts skips by these; the module logs ``data/skipped/<reason>``)
#: ``video``: a corrupt, undecodable or empty video (or frames over the size cap); ``video_short``: fewer
#: decodable frames than the frame policy's ``min_frames`` (both from ``data/video.py``);
#: ``image_too_large``: an image whose header states more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``
#: (a decompression bomb: refused before its pixels are decoded). New reasons go at the end (the
#: module's counters index this tuple).
SKIP_REASONS = ("decode", "processor", "missing_member", "bad_json", "bad_text", "truncated_shard", "video",
                "video_short", "image_too_large")


class BadSample(ValueError):
    """A sample that cannot become an ``Example``; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def to_rgb(image: Image.Image) -> Image.Image:
    """The pixels a backbone sees, as every loader converts them: EXIF orientation applied (what a viewer
    shows), transparency composited over white (P with a transparent index, LA, RGBA, ...), 16-bit and
    float greyscale (I;16, I, F) scaled to 8 bits (values over 255 read as 16-bit), any other mode
    (1, L, P, CMYK, YCbCr, ...) converted by PIL."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        import numpy as np

        a = np.asarray(image, dtype=np.float64)
        a = a / 257.0 if a.size and a.max() > 255 else a
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def fit(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """The image resized down (bicubic) to at most ``max_pixels`` pixels, aspect kept: each side scaled by
    ``sqrt(max_pixels / (w * h))`` and rounded down (at least 1), so the result never exceeds the cap."""
    w, h = image.size
    if max_pixels is None or w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    size = (max(1, math.floor(w * scale)), max(1, math.floor(h * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def open_image(data: bytes, what: str) -> Image.Image:
    """An image's bytes decoded and converted by ``to_rgb``. Raises ``BadSample``: ``image_too_large`` when
    its header states more than ``Image.MAX_IMAGE_PIXELS`` pixels (PIL warns between 1x and 2x that limit
    and raises ``DecompressionBombError`` above; both are refused here, before the pixels are decoded),
    ``decode`` for bytes PIL cannot read. ``what`` names the image in the message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample("image_too_large", f"{what}: {_one_line(exc)}") from None
    except Exception as exc:
        raise BadSample("decode", f"{what}: {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
