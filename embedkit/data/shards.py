"""The shard codec: ``Example`` <-> WebDataset sample, and an atomic shard writer.

A sample is the WebDataset convention (files sharing a key in a tar):
    <key>.json      {"task": str, "query": slot, "positive": slot, "negatives": [slot, ...],
                     "negative_scores": [float, ...] (mined shards only)}
                    slot = {"text": str | null, "image": "<file extension>" | null}
    <key>.q.<ext>   the query's image bytes, <key>.p.<ext> the positive's, <key>.n<i>.<ext> negatives'
Image bytes are stored as they came (MMEB's JPEGs are not re-encoded); the demo writes PNG.
Shards are written under a temporary name and renamed when complete, so a reader never sees a
partial shard and an interrupted writer can be re-run.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from embedkit.data.remote import is_remote
from embedkit.data.schema import Example, Item
from embedkit.files import atomic_path


@dataclass
class ImageBytes:
    """An image kept as its encoded bytes (no decode/re-encode on the way into a shard)."""

    data: bytes
    ext: str  # "png", "jpg", ...


def _image_bytes(image) -> ImageBytes:
    if isinstance(image, ImageBytes):
        return image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return ImageBytes(buf.getvalue(), "png")


def encode_example(example: Example, key: str) -> dict[str, bytes]:
    """Files of one sample: {"<key>.json": ..., "<key>.q.png": ...}."""
    files: dict[str, bytes] = {}

    def slot(item: Item, tag: str) -> dict:
        ext = None
        if item.image is not None:
            img = _image_bytes(item.image)
            ext = img.ext
            files[f"{key}.{tag}.{ext}"] = img.data
        return {"text": item.text, "image": ext}

    meta = {
        "task": example.task,
        "query": slot(example.query, "q"),
        "positive": slot(example.positive, "p"),
        "negatives": [slot(item, f"n{i}") for i, item in enumerate(example.negatives)],
    }
    if example.negative_scores is not None:
        meta["negative_scores"] = [float(x) for x in example.negative_scores]
    files[f"{key}.json"] = json.dumps(meta).encode()
    return files


#: why a sample is skipped (``SourceReader`` counts skips by these; the module logs ``data/skipped/<reason>``)
#: ``video``: a corrupt, undecodable or empty video (or frames over the size cap); ``video_short``: fewer
#: decodable frames than the frame policy's ``min_frames`` (both from ``data/video.py``)
SKIP_REASONS = ("decode", "processor", "missing_member", "bad_json", "bad_text", "truncated_shard", "video",
                "video_short")


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


def _slot_text(slot: dict, where: str) -> str | None:
    text = slot.get("text")
    if text is None:
        return None
    if not isinstance(text, str):
        raise BadSample("bad_text", f"{where}: text is a {type(text).__name__}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (a JSON \udXXX escape): no tokenizer takes it
        raise BadSample("bad_text", f"{where}: text is not valid Unicode") from None
    return text


def _slot_image(slot: dict, files: dict[str, bytes], key: str, tag: str):
    ext = slot.get("image")
    if not ext:
        return None
    if not isinstance(ext, str):
        raise BadSample("bad_json", f"{tag}: image is a {type(ext).__name__}, not a file extension")
    name = f"{key}.{tag}.{ext}"
    if name not in files:  # declared by the JSON but not in the shard (a renamed or lost member)
        raise BadSample("missing_member", f"no member {name} (the JSON declares it)")
    try:
        image = Image.open(io.BytesIO(files[name]))
        image.load()
        return to_rgb(image)
    except Exception as exc:
        raise BadSample("decode", f"{name}: {type(exc).__name__}: {exc}") from None


def _meta(key: str, files: dict[str, bytes]) -> dict:
    if f"{key}.json" not in files:
        raise BadSample("missing_member", f"no member {key}.json")
    try:
        meta = json.loads(files[f"{key}.json"])
    except UnicodeDecodeError as exc:
        raise BadSample("bad_text", f"{key}.json is not UTF-8 ({exc})") from None
    except ValueError as exc:
        raise BadSample("bad_json", f"{key}.json: {exc}") from None
    slots = [meta.get("query"), meta.get("positive"), *(meta.get("negatives") or [])] if isinstance(meta, dict) else []
    if not slots or not all(isinstance(s, dict) for s in slots) or not isinstance(meta.get("negatives", []), list):
        raise BadSample("bad_json", f"{key}.json: not a sample (query, positive, negatives)")
    return meta


def decode_sample(key: str, files: dict[str, bytes]) -> Example:
    """An ``Example`` from one sample's files, images converted by ``to_rgb``; raises ``BadSample`` (its
    ``reason`` one of ``SKIP_REASONS``) for a malformed JSON, a text that is not one, a declared member
    that is missing or an image that does not decode."""
    meta = _meta(key, files)

    def item(slot: dict, tag: str) -> Item:
        text, image = _slot_text(slot, tag), _slot_image(slot, files, key, tag)
        if text is None and image is None:
            raise BadSample("bad_text", f"{tag}: neither text nor image")
        return Item(text=text, image=image)

    scores = meta.get("negative_scores")
    return Example(
        query=item(meta["query"], "q"),
        positive=item(meta["positive"], "p"),
        negatives=[item(s, f"n{i}") for i, s in enumerate(meta.get("negatives") or [])],
        task=meta["task"] if isinstance(meta.get("task"), str) else "default",
        negative_scores=scores if isinstance(scores, list) else None,
    )


def sample_key(member_name: str) -> str:
    """The sample a tar member belongs to: its file name up to the first dot (``k001.q.png`` -> ``k001``).
    A sample is a run of consecutive members with one key (WebDataset's grouping, on the base name)."""
    return os.path.basename(member_name).split(".", 1)[0]


def iter_samples(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, files) per sample of a tar, grouping consecutive files by ``sample_key``.

    A truncated tar raises ``tarfile.ReadError`` after the complete samples before the cut; the
    sample being read when the data ended is never yielded. ``path`` may be a URL or ``pipe:``
    command (read by ``embedkit.data.remote``, which retries and resumes a dropped connection)."""
    if is_remote(path):  # a URL or pipe: (embedkit.data.remote); local files never go there
        from embedkit.data.remote import open_shard

        with open_shard(path) as f:
            yield from _samples(tarfile.open(fileobj=f, mode="r:"), path)
        return
    yield from _samples(tarfile.open(path, "r"), path)


def _samples(tar: tarfile.TarFile, path) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, files = None, {}
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            k = sample_key(name)
            if key is not None and k != key:
                yield key, files
                files = {}
            key = k
            files[name] = tar.extractfile(member).read()
            if len(files[name]) != member.size:
                raise tarfile.ReadError(f"{path}: truncated inside {name}")
        _check_end_marker(tar, path)  # tarfile ends silently at a cut header: the last sample may be partial
    if key is not None:
        yield key, files


def _check_end_marker(tar: tarfile.TarFile, path) -> None:
    """Raise ReadError unless a zero block (end of archive) follows the last member."""
    tar.fileobj.seek(tar.offset)
    tail = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(tail) < tarfile.BLOCKSIZE or tail.strip(b"\0"):
        raise tarfile.ReadError(f"{path}: truncated (no end-of-archive block at byte {tar.offset})")


def count_samples(path: str | Path) -> int:
    """How many samples ``iter_samples(path)`` yields, from the member headers only (the data is
    seeked over, never read). The one counting rule of the project: runs of consecutive members with
    one ``sample_key``; in a cut tar (no end-of-archive block, a member's data or a header cut short)
    the last run is not counted, since ``iter_samples`` never yields the sample being read when the
    data ended. A remote shard (URL, ``pipe:``) cannot be seeked over: it is read through once for
    its headers (nothing decoded) and its count kept for the process."""
    if is_remote(path):
        return _remote_count(str(path))
    return _count_members(lambda: tarfile.open(path, "r"), path)


@functools.lru_cache(maxsize=None)
def _remote_count(url: str) -> int:
    from embedkit.data.remote import open_shard

    with open_shard(url) as f:
        return _count_members(lambda: tarfile.open(fileobj=f, mode="r:"), url)


def _count_members(open_tar, path) -> int:
    runs, key = 0, None
    try:
        with open_tar() as tar:
            for member in tar:
                if member.isfile() and sample_key(member.name) != key:
                    runs, key = runs + 1, sample_key(member.name)
            _check_end_marker(tar, path)
    except (tarfile.TarError, OSError):
        return max(0, runs - 1)  # a cut tar: the sample being read when the data ended is never yielded
    return runs


def write_shard(path: str | Path, samples: list[dict[str, bytes]]) -> None:
    """Write one tar of samples atomically (under a temporary name, renamed when complete)."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for files in samples:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0  # reproducible bytes: same input, same shard
                tar.addfile(info, io.BytesIO(data))


def list_shards(spec: str | Path) -> list[str]:
    """Shard paths from a folder (every .tar under it, sorted) or a brace pattern / single file;
    a URL or ``pipe:`` spec gives URLs (``remote.expand``: brace expansion or a prefix listing)."""
    if is_remote(spec):
        from embedkit.data.remote import expand

        return expand(str(spec))
    p = Path(spec).expanduser()
    if p.is_dir():
        return sorted(str(x) for x in p.rglob("*.tar"))
    import braceexpand

    return [s for s in braceexpand.braceexpand(str(spec))]
