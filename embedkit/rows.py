"""Input rows -> ``Item``s: the row format ``embedkit encode`` reads and the corpus tasks of ``embedkit eval``.

A row is a mapping with ``text`` and at most one kind of visual: ``image`` (a path, relative to the
file's folder, or encoded bytes; parquet image structs with ``bytes`` or ``path``), ``images`` (a list
of those, in the order of the text's ``<|image_k|>``) or ``video`` (a path or bytes, sampled by the
model's frame policy). ``read_rows`` reads JSONL or parquet; ``RowItems`` makes the items on demand.
"""

from __future__ import annotations

import io
from pathlib import Path

from embedkit.data.schema import Item
from embedkit.encoder import capped, prefixed, prefixed_item, to_frames
from embedkit.errors import UserError
from embedkit.files import read_jsonl
from embedkit.inference import LazyItems


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"input: file not found: {path}")
    if path.suffix == ".jsonl":
        return read_jsonl(path, "input")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise UserError(f"input: {path} must be .jsonl or .parquet")


def to_image(value, root: Path):
    """The row's image decoded (RGB), or None."""
    image = open_image(value, root)
    return image.convert("RGB") if image is not None else None


def open_image(value, root: Path):
    """The row's image opened, not decoded (its size is known), or None; ``UserError`` when missing."""
    from PIL import Image

    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    path = Path(value) if Path(value).is_absolute() else root / value
    if not path.is_file():
        raise UserError(f"input: image not found: {path}")
    return Image.open(path)


class RowItems(LazyItems):
    """Rows as ``Item``s made on demand, ``prefix`` (an instruction) before every text: ``self[i]``
    decodes the images (or samples the video by ``policy``, a ``FramePolicy``); ``sized(i)`` only opens
    the images (their sizes, for the engine's costs, before ``max_pixels``; a video is sampled, its frames
    are its cost). Images over ``max_pixels`` are resized down (``encoder.capped``). ``first``: the input
    row number of ``rows[0]`` (0-based), for messages. Picklable."""

    def __init__(self, rows: list[dict], root: Path, prefix: str | None = None, policy=None, first: int = 0,
                 max_pixels: int | None = None):
        self.rows, self.root, self.prefix, self.policy, self.first = rows, root, prefix, policy, first
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def _item(self, i: int, image) -> Item:
        return prefixed_item(self.rows[i].get("text"), image, self.prefix)

    def __getitem__(self, i: int) -> Item:
        item = self._visuals(i, to_image) or self._item(i, self._open(to_image, i, self.rows[i].get("image")))
        return capped(item, self.max_pixels)

    def sized(self, i: int) -> Item:
        def header(value, root):
            image = open_image(value, root)
            if image is not None:
                image.close()  # the header is read: the size stays known, nothing is decoded
            return image

        return self._visuals(i, header) or self._item(i, self._open(header, i, self.rows[i].get("image")))

    def _open(self, read, i: int, value):
        try:
            return read(value, self.root)
        except UserError as exc:
            raise UserError(f"input: row {self.first + i + 1}: {str(exc).removeprefix('input: ')}") from None
        except Exception as exc:  # bytes PIL cannot read
            raise UserError(f"input: row {self.first + i + 1}: image does not decode ({type(exc).__name__})") from None

    def _visuals(self, i: int, read) -> Item | None:
        """The row as an ``Item`` when it has ``images`` or a ``video``; None for the one-image form."""
        row = self.rows[i]
        images, video = row.get("images"), row.get("video")
        if images is None and video is None:
            return None
        where = f"input: row {self.first + i + 1}"
        if images is not None and (video is not None or row.get("image") is not None):
            raise UserError(f"{where}: images with a video or an image; a row holds one kind of visual")
        if video is not None:
            path = video if isinstance(video, (bytes, bytearray)) or Path(video).is_absolute() else self.root / video
            return prefixed(Item(row.get("text"), video=to_frames(path, self.policy, where)), self.prefix)
        if not isinstance(images, list) or not images:
            raise UserError(f"{where}: images must be a non-empty list of paths")
        return prefixed(Item(row.get("text"), images=[self._open(read, i, v) for v in images]), self.prefix)
