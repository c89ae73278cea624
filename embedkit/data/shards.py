"""The shard codec: ``Example`` <-> WebDataset sample, and an atomic shard writer.

A sample is the WebDataset convention (files sharing a key in a tar):
    <key>.json      {"task": str, "query": slot, "positive": slot, "negatives": [slot, ...],
                     "negative_scores": [float, ...] (mined shards only)}
A slot is one item; its JSON names every member it needs (a member the JSON declares but the shard
lacks is ``missing_member``, never a silent text-only item). ``<tag>`` is ``q``, ``p`` or ``n<i>``:
    {"text": str | null, "image": null}                        text only
    {"text": ..., "image": "<ext>"}                           one image: <key>.<tag>.<ext> (the first form;
                                                              one-image items are still written so)
    {"text": ..., "images": ["img1.png", "img2.jpg", ...]}    several images, in order: <key>.<tag>.img1.png ...
    {"text": ..., "frames": ["frame000.png", ...],            a video's frames, in order, and their
     "timestamps": [float, ...] | null}                       timestamps (s): <key>.<tag>.frame000.png ...
    {"text": ..., "video": "video.mp4"}                       a video file, decoded at read time: <key>.<tag>.video.mp4
A taught sample (``embedkit teach``) also holds its teacher's data, each a ``.npy`` array member
(numpy's format, read without pickle): ``<key>.teacher.npy`` (float16 or float32 [2 + k, Dt]: the
embeddings of the query, the positive and the k negatives, in slot order) and/or
``<key>.teacher_scores.npy`` (float32 [1 + k]: a judge's scores of the positive and the negatives);
``decode_sample`` puts them in ``Example.teacher`` (an array with the wrong row count is ``bad_json``).
Image bytes are stored as they came (``ImageBytes``: MMEB's JPEGs are not re-encoded); decoded images
and frames are written as PNG. A stored video is ``VideoBytes``. Reading applies the run's
``FramePolicy`` to frames (``frames_from_images``'s rule; only the picked frames are decoded) and to a
video file (``read_video``) alike, and
``max_image_pixels`` (``data.max_image_pixels``) to images: a larger one is resized down, aspect kept,
and reported to ``on_resize``. Shards are written under a temporary name and renamed when complete, so
a reader never sees a partial shard and an interrupted writer can be re-run.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from embedkit.data.pixels import SKIP_REASONS, BadSample, fit, open_image, to_rgb
from embedkit.data.remote import is_remote
from embedkit.data.schema import Example, Item, TeacherArrays
from embedkit.data.video import FramePolicy, Frames, fps_indices, read_video, uniform_indices
from embedkit.files import atomic_path

#: the codec's names, and those of ``pixels`` it re-exports (``SKIP_REASONS``, ``BadSample``, ``to_rgb``: their old home)
__all__ = ["SKIP_REASONS", "TEACHER_MEMBERS", "BadSample", "Decoding", "ImageBytes", "StoredSlot", "VideoBytes", "count_samples",
           "decode_sample", "encode_example", "iter_samples", "list_shards", "sample_key", "slot_has_visual",
           "npy_bytes", "stored_slot", "to_rgb", "write_shard"]

#: the teacher's array members of a taught sample: ``<key>.<name>`` (module docstring)
TEACHER_MEMBERS = {"embeddings": "teacher.npy", "scores": "teacher_scores.npy"}


@dataclass
class ImageBytes:
    """An image kept as its encoded bytes (no decode/re-encode on the way into a shard)."""

    data: bytes
    ext: str  # "png", "jpg", ...


@dataclass
class VideoBytes:
    """A video file kept as its encoded bytes (``encode_example(videos=...)``), decoded when read."""

    data: bytes
    ext: str  # "mp4", "webm", "mkv", ...


@dataclass
class StoredSlot:
    """One slot as a shard stores it: its JSON (``text`` and the visual keys) and the bytes of the members
    it declares, by their names without the ``<key>.<tag>.`` prefix. ``encode_example`` takes one in place
    of an ``Item`` and copies it verbatim (``embedkit mine`` copies slots so); ``Decoding.item`` decodes it."""

    meta: dict
    members: dict[str, bytes]


def stored_slot(key: str, files: dict[str, bytes], slot: dict, tag: str) -> StoredSlot:
    """The slot ``tag`` of a sample as stored; ``BadSample`` (``missing_member``, ``bad_json``) as
    ``decode_sample`` raises for a member it lacks or a malformed slot."""
    reading = _Reading(key, files, FramePolicy(), None, None)
    if not isinstance(slot, dict):
        raise BadSample("bad_json", f"{key}.{tag}: not a slot")
    names = [n for k in _VISUAL_KEYS if slot.get(k) for n in _member_names(slot, k, tag)]
    return StoredSlot(dict(slot), {n: reading.member(tag, n) for n in names})


def _member_names(slot: dict, kind: str, tag: str) -> list:
    return [slot[kind]] if kind in ("image", "video") else _names(slot, kind, tag)


def _image_bytes(image) -> ImageBytes:
    if isinstance(image, ImageBytes):
        return image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return ImageBytes(buf.getvalue(), "png")


def _ext(ext: str, what: str) -> str:
    ext = str(ext).lstrip(".")
    if not ext.isalnum():
        raise ValueError(f"{what}: file extension {ext!r} is not a plain extension (png, jpg, mp4, ...)")
    return ext


def _visual_slot(item: Item, tag: str, key: str, files: dict, video: VideoBytes | None) -> dict:
    """The slot's visual keys, its members added to ``files``."""
    if video is not None:
        if item.has_visual:
            raise ValueError(f"slot {tag}: a stored video file and the item's own visuals; give one")
        name = f"video.{_ext(video.ext, tag)}"
        files[f"{key}.{tag}.{name}"] = bytes(video.data)
        return {"video": name}
    if item.video is not None:
        names = _put(files, key, tag, "frame{:03d}", item.video.images)
        stamps = item.video.timestamps
        return {"frames": names, "timestamps": None if stamps is None else [float(t) for t in stamps]}
    if len(item.images) > 1:
        return {"images": _put(files, key, tag, "img{}", item.images, start=1)}
    if item.images:  # one image: the first form, so existing readers and caches see what they always saw
        img = _image_bytes(item.images[0])
        ext = _ext(img.ext, tag)
        files[f"{key}.{tag}.{ext}"] = img.data
        return {"image": ext}
    return {"image": None}


def _put(files: dict, key: str, tag: str, stem: str, images, start: int = 0) -> list[str]:
    names = []
    for i, image in enumerate(images, start):
        img = _image_bytes(image)
        name = f"{stem.format(i)}.{_ext(img.ext, tag)}"
        files[f"{key}.{tag}.{name}"] = img.data
        names.append(name)
    return names


def encode_example(example: Example, key: str, videos: Mapping[str, VideoBytes] | None = None) -> dict[str, bytes]:
    """Files of one sample: {"<key>.json": ..., "<key>.q.png": ...}, any ``Item`` (text, images, a
    video's frames). ``videos`` maps a slot's tag (``q``, ``p``, ``n0``, ...) to a video file stored
    for it as it is (decoded at read time with the reader's frame policy); that slot's item then holds
    text only (``Item(text="")`` for none)."""
    files: dict[str, bytes] = {}
    videos = dict(videos or {})
    tags = ["q", "p", *(f"n{i}" for i in range(len(example.negatives)))]
    unknown = sorted(set(videos) - set(tags))
    if unknown:
        raise ValueError(f"encode_example: videos for slot {unknown[0]!r}, which the example lacks ({', '.join(tags)})")

    def slot(item: Item | StoredSlot, tag: str) -> dict:
        if isinstance(item, StoredSlot):  # copied as stored, under this sample's key and tag
            files.update({f"{key}.{tag}.{name}": data for name, data in item.members.items()})
            return dict(item.meta)
        return {"text": item.text, **_visual_slot(item, tag, key, files, videos.get(tag))}

    meta = {
        "task": example.task,
        "query": slot(example.query, "q"),
        "positive": slot(example.positive, "p"),
        "negatives": [slot(item, f"n{i}") for i, item in enumerate(example.negatives)],
    }
    if example.negative_scores is not None:
        meta["negative_scores"] = [float(x) for x in example.negative_scores]
    files[f"{key}.json"] = json.dumps(meta).encode()
    if example.teacher is not None:  # a taught example's arrays (module docstring)
        for field_name, member in TEACHER_MEMBERS.items():
            if getattr(example.teacher, field_name) is not None:
                files[f"{key}.{member}"] = npy_bytes(getattr(example.teacher, field_name))
    return files


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


@dataclass(frozen=True)
class _Reading:
    """How one sample's visuals are read: its key and files, the frame policy, the image pixel cap and
    where resizes are reported."""

    key: str
    files: dict
    policy: FramePolicy
    max_image_pixels: int | None
    on_resize: Callable[[str], None] | None

    def member(self, tag: str, name) -> bytes:
        if not isinstance(name, str) or not name or "/" in name:
            raise BadSample("bad_json", f"{tag}: member name {name!r} is not a file name")
        full = f"{self.key}.{tag}.{name}"
        if full not in self.files:  # declared by the JSON but not in the shard (a renamed or lost member)
            raise BadSample("missing_member", f"no member {full} (the JSON declares it)")
        return self.files[full]

    def image(self, tag: str, name: str):
        what = f"{self.key}.{tag}.{name}"
        image = open_image(self.member(tag, name), what)
        capped = fit(image, self.max_image_pixels)
        if capped is not image and self.on_resize is not None:
            self.on_resize(f"{what}: {image.size[0]}x{image.size[1]} resized to {capped.size[0]}x{capped.size[1]} "
                           f"(data.max_image_pixels={self.max_image_pixels})")
        return capped


#: a slot's visual keys; a slot holds at most one of them
_VISUAL_KEYS = ("image", "images", "frames", "video")


def slot_has_visual(slot: dict) -> bool:
    """Whether a sample JSON's slot declares a visual (an image, several, a video's frames or a video file),
    from the JSON alone (nothing decoded)."""
    return any(slot.get(k) for k in _VISUAL_KEYS)


def _names(slot: dict, field: str, tag: str) -> list:
    names = slot[field]
    if not isinstance(names, list) or not names:
        raise BadSample("bad_json", f"{tag}: {field} is not a non-empty list of member names")
    return names


def _slot_visuals(slot: dict, tag: str, r: _Reading) -> dict:
    """The ``Item`` keyword arguments of a slot's visuals ({} for none)."""
    present = [k for k in _VISUAL_KEYS if slot.get(k)]
    if len(present) > 1:
        raise BadSample("bad_json", f"{tag}: holds {' and '.join(present)}; a slot holds one kind of visual")
    if not present:
        return {}
    kind = present[0]
    if kind == "image":
        if not isinstance(slot["image"], str):
            raise BadSample("bad_json", f"{tag}: image is a {type(slot['image']).__name__}, not a file extension")
        return {"images": [r.image(tag, slot["image"])]}
    if kind == "images":
        return {"images": [r.image(tag, n) for n in _names(slot, "images", tag)]}
    if kind == "frames":
        return {"video": _frames(slot, tag, r)}
    return {"video": read_video(r.member(tag, slot["video"]), r.policy)}


def _frames(slot: dict, tag: str, r: _Reading) -> Frames:
    """A frames slot sampled by the policy: every declared member must be there, only the picked frames
    are decoded (as ``read_video`` decodes only its picks); the same ``Frames`` as ``frames_from_images``
    on all of them."""
    names = _names(slot, "frames", tag)
    stamps = slot.get("timestamps")
    ok = stamps is None or (isinstance(stamps, list) and len(stamps) == len(names)
                            and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in stamps))
    if not ok:
        raise BadSample("bad_json", f"{tag}: timestamps is not one number per frame ({len(names)} frames)")
    data = [r.member(tag, n) for n in names]
    picks = _frame_picks(len(names), stamps, r.policy, f"{r.key}.{tag}")
    images = [fit(open_image(data[i], f"{r.key}.{tag}.{names[i]}"), r.policy.max_pixels) for i in picks]
    return Frames(images, None if stamps is None else [float(stamps[i]) for i in picks], picks, len(names))


def _frame_picks(n: int, stamps: list | None, policy: FramePolicy, what: str) -> list[int]:
    """The frame indices ``policy`` keeps of ``n`` stored frames (``frames_from_images``'s rule)."""
    if n < policy.min_frames:
        raise BadSample("video_short", f"{what}: {n} frames, fewer than min_frames={policy.min_frames}")
    if policy.sampling != "fps":
        return uniform_indices(n, policy.num_frames)
    if stamps is None:
        raise BadSample("video", f"{what}: frames without timestamps (sampling=fps needs them)")
    return fps_indices([float(t) for t in stamps], policy.fps, policy.num_frames)


def _item(slot: dict, tag: str, reading: _Reading) -> Item:
    text, visuals = _slot_text(slot, tag), _slot_visuals(slot, tag, reading)
    if text is None and not visuals:
        raise BadSample("bad_text", f"{tag}: neither text nor a visual")
    return Item(text=text, **visuals)


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


def npy_bytes(array) -> bytes:
    """``array`` in numpy's ``.npy`` format (the same array, the same bytes)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _teacher(key: str, files: dict[str, bytes], negatives: int) -> TeacherArrays | None:
    """The sample's teacher arrays (None when it was not taught); ``bad_json`` for an unreadable one or
    one whose rows do not match the slots."""
    import numpy as np

    arrays = {}
    for field_name, member in TEACHER_MEMBERS.items():
        data = files.get(f"{key}.{member}")
        if data is None:
            continue
        try:
            arrays[field_name] = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:
            raise BadSample("bad_json", f"{key}.{member}: not a .npy array ({exc})") from None
    rows = {"embeddings": 2 + negatives, "scores": 1 + negatives}
    for field_name, array in arrays.items():
        if array.shape[0] != rows[field_name]:
            raise BadSample("bad_json", f"{key}.{TEACHER_MEMBERS[field_name]}: {array.shape[0]} rows for "
                                        f"{rows[field_name]} slots")
    return TeacherArrays(**arrays) if arrays else None


def decode_sample(key: str, files: dict[str, bytes], policy: FramePolicy | None = None,
                  max_image_pixels: int | None = None, on_resize: Callable[[str], None] | None = None) -> Example:
    """An ``Example`` from one sample's files (any slot form of the module docstring).

    Images are converted by ``to_rgb``; a video's frames (stored as images or as a video file) are
    sampled by ``policy`` (None: ``FramePolicy()``); an image over ``max_image_pixels`` is resized down, aspect kept, and
    ``on_resize(message)`` called (a resize, not a skip). Raises ``BadSample`` (its ``reason`` one of
    ``SKIP_REASONS``) for a malformed JSON, a text that is not one, a declared member that is missing,
    an image that does not decode (``decode``) or states too many pixels (``image_too_large``), or a
    video that is corrupt, empty (``video``) or too short (``video_short``)."""
    meta = _meta(key, files)
    reading = _Reading(key, files, policy or FramePolicy(), max_image_pixels, on_resize)
    scores = meta.get("negative_scores")
    negatives = [_item(s, f"n{i}", reading) for i, s in enumerate(meta.get("negatives") or [])]
    return Example(
        query=_item(meta["query"], "q", reading),
        positive=_item(meta["positive"], "p", reading),
        negatives=negatives,
        task=meta["task"] if isinstance(meta.get("task"), str) else "default",
        negative_scores=scores if isinstance(scores, list) else None,
        teacher=_teacher(key, files, len(negatives)),
    )


@dataclass(frozen=True)
class Decoding:
    """How a run decodes its samples' visuals: the frame policy (``data.video``) and the image pixel cap
    (``data.max_image_pixels``). Picklable (it travels to DataLoader workers)."""

    policy: FramePolicy = field(default_factory=FramePolicy)
    max_image_pixels: int | None = None

    @classmethod
    def from_config(cls, data: Mapping) -> Decoding:
        """From the config's ``data`` section; a key it lacks keeps its default."""
        return cls(FramePolicy.from_config(data.get("video") or {}), data.get("max_image_pixels"))

    def decode(self, key: str, files: dict[str, bytes], on_resize: Callable[[str], None] | None = None) -> Example:
        """``decode_sample`` with this policy and cap."""
        return decode_sample(key, files, self.policy, self.max_image_pixels, on_resize)

    def item(self, slot: StoredSlot, on_resize: Callable[[str], None] | None = None) -> Item:
        """One stored slot decoded with this policy and cap, as ``decode_sample`` decodes a slot."""
        files = {f"slot.s.{name}": data for name, data in slot.members.items()}
        return _item(slot.meta, "s", _Reading("slot", files, self.policy, self.max_image_pixels, on_resize))


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
