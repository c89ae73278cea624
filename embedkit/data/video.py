"""A video -> a few RGB frames with their timestamps, by a frame-sampling policy (``FramePolicy``).

Two sources, one policy: ``read_video`` decodes a file or its encoded bytes (a shard member) with PyAV,
``frames_from_images`` takes already-extracted frames (MMEB-V2 ships frame folders). The same frames
give the same ``Frames`` either way.

Sampling (facts from /work/shared/research/mmeb-v2.md section 2 and VLM2Vec-V2, paper section 4.1.2):
- ``"uniform"``: by index, ``floor(linspace(0, n - 1, num_frames))`` as the benchmark's ``sample_frames``
  (``np.linspace(..., dtype=int)``); a video of ``n <= num_frames`` frames gives all of them, no padding.
- ``"fps"``: one frame every ``1 / fps`` seconds of presentation time (from the first frame's timestamp,
  the first frame at or after each instant), at most ``num_frames``: more are thinned by the uniform rule.
Frames over ``max_pixels`` are resized down, aspect kept (``_fit``). Bad input raises
``pixels.BadSample``: ``video`` (corrupt, undecodable, empty, or frames over ``MAX_FRAME_PIXELS``) or
``video_short`` (fewer than ``min_frames`` decodable frames). PyAV is imported only when a video is read.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

from embedkit.data.pixels import BadSample, to_rgb
from embedkit.data.pixels import fit as _fit
from embedkit.errors import ConfigError

#: frame dimensions beyond this (w * h) are refused before any frame is decoded (a decompression bomb);
#: PIL's own limit (``Image.MAX_IMAGE_PIXELS``) applies too when it is lower
MAX_FRAME_PIXELS = 2**26

SAMPLINGS = ("uniform", "fps")


@dataclass(frozen=True)
class FramePolicy:
    """Which frames of a video an item keeps, and how large.

    num_frames: the most frames kept (8: VLM2Vec-V2's "8 uniformly sampled frames", mmeb-v2.md section 2).
    sampling: "uniform" (by index) or "fps" (by presentation time, needs ``fps``).
    fps: frames per second of video for "fps" sampling; None for "uniform".
    min_frames: a source with fewer decodable frames is too short (``BadSample("video_short")``).
    max_pixels: a frame with more pixels is resized down to fit, aspect kept; None: native size.
    """

    num_frames: int = 8
    sampling: str = "uniform"
    fps: float | None = None
    min_frames: int = 1
    max_pixels: int | None = None

    def __post_init__(self):
        _positive_int("num_frames", self.num_frames)
        _positive_int("min_frames", self.min_frames)
        if self.max_pixels is not None:
            _positive_int("max_pixels", self.max_pixels)
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"frame policy sampling: {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        self._check_fps()

    def _check_fps(self) -> None:
        if self.sampling == "uniform":
            if self.fps is not None:
                raise ConfigError("frame policy fps: only for sampling=fps (sampling is uniform)")
            return
        ok = isinstance(self.fps, (int, float)) and not isinstance(self.fps, bool)
        if not ok or not math.isfinite(self.fps) or self.fps <= 0:
            raise ConfigError(f"frame policy fps: sampling=fps needs a positive number, got {self.fps!r}")

    @classmethod
    def from_config(cls, section: Mapping) -> FramePolicy:
        """A policy from a config mapping (keys as the fields); an unknown key is a one-line error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"frame policy: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**dict(section))


def _positive_int(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"frame policy {key}: must be a positive integer, got {value!r}")


@dataclass
class Frames:
    """The frames a policy kept: RGB images, their timestamps in seconds (PTS x time_base for a video, None
    for a stream without PTS such as raw H.264; as given, or None, for a list), their indices in the source, the source's frame count and its
    duration in seconds (None when unknown)."""

    images: list[Image.Image]
    timestamps: list[float] | None
    indices: list[int]
    source_frames: int
    duration: float | None = None


def uniform_indices(n: int, k: int) -> list[int]:
    """``np.linspace(0, n - 1, k, dtype=int)`` (the benchmark's ``sample_frames``, mmeb-v2.md section 2); all of
    ``range(n)`` when n <= k. NumPy's float steps, not exact fractions: they differ (n=123, k=15: 60, not
    61), and the benchmark's frames are NumPy's (docs/bugs-and-fixes.md)."""
    import numpy as np

    if n <= k:
        return list(range(n))
    return np.linspace(0, n - 1, k, dtype=int).tolist()


def fps_indices(times: Sequence[float], fps: float, k: int) -> list[int]:
    """Indices of the first frame at or after each instant ``times[0] + j / fps`` (j = 0, 1, ... up to
    the last frame's time), each frame once; more than ``k`` thinned by ``uniform_indices``.
    ``times``: every frame's presentation time in seconds, ascending."""
    if not times:
        return []
    eps = 1e-6  # a microsecond: PTS rounding never moves a frame before its instant
    picks: list[int] = []
    i, j = 0, 0
    while True:
        instant = times[0] + j / fps
        if instant > times[-1] + eps:
            break
        while times[i] < instant - eps:
            i += 1
        if not picks or picks[-1] != i:
            picks.append(i)
        j += 1
    return [picks[x] for x in uniform_indices(len(picks), k)]


def _check_count(n: int, policy: FramePolicy, what: str) -> None:
    if n == 0:
        raise BadSample("video", f"{what}: no frames")
    if n < policy.min_frames:
        raise BadSample("video_short", f"{what}: {n} frames, fewer than min_frames={policy.min_frames}")


def frames_from_images(images: Sequence[Image.Image], timestamps: Sequence[float] | None = None,
                       policy: FramePolicy = FramePolicy()) -> Frames:
    """``policy`` applied to a video's already-extracted frames, in order (``timestamps`` in seconds,
    one per image, needed for "fps" sampling). Returns the same ``Frames`` as ``read_video`` on a video
    of these frames at these timestamps (duration None: a list does not say it)."""
    if timestamps is not None and len(timestamps) != len(images):
        raise ValueError(f"frames_from_images: {len(images)} images but {len(timestamps)} timestamps")
    if policy.sampling == "fps" and timestamps is None:
        raise ValueError("frames_from_images: sampling=fps needs the frames' timestamps")
    _check_count(len(images), policy, "frame list")
    if policy.sampling == "fps":
        picks = fps_indices([float(t) for t in timestamps], policy.fps, policy.num_frames)
    else:
        picks = uniform_indices(len(images), policy.num_frames)
    return Frames(images=[_fit(to_rgb(images[i]), policy.max_pixels) for i in picks],
                  timestamps=None if timestamps is None else [float(timestamps[i]) for i in picks],
                  indices=picks, source_frames=len(images))


def read_video(source: str | Path | bytes, policy: FramePolicy = FramePolicy()) -> Frames:
    """The frames ``policy`` keeps of a video: ``source`` a path or the encoded file's bytes.
    Raises ``BadSample`` ("video" or "video_short") with a one-line message for bad input."""
    import av

    what = "video bytes" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        return _read(source, policy, what)
    except av.error.FFmpegError as exc:
        raise BadSample("video", f"{what}: {type(exc).__name__}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _open(source):
    import av

    return av.open(io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else str(source))


def _read(source, policy: FramePolicy, what: str) -> Frames:
    with _open(source) as container:
        stream = _video_stream(container, what)
        duration = _duration(container, stream)
        stated = 0 if policy.sampling == "fps" else _stated_frames(stream)
        times = None if stated else _packet_times(container, stream)
    if policy.sampling == "fps" and None in times:
        times = _decoded_times(source, what)
    n = len(times) if times is not None else stated
    _check_count(n, policy, what)
    picks = fps_indices(times, policy.fps, policy.num_frames) if policy.sampling == "fps" \
        else uniform_indices(n, policy.num_frames)
    kept, decoded = _decode(source, picks, policy, what)
    if len(kept) < len(picks):  # decoding ended early: fewer frames than the header or the packets said
        _check_count(decoded, policy, what)
        if times is None:  # the header's count was too high: pick again from the frames there are
            return _read_counted(source, policy, what, decoded, duration)
    # fewer frames decoded than packets demuxed, without an error: the picks that were reached
    return Frames([im for im, _ in kept], _stamps(kept), picks[:len(kept)], n, duration)


def _read_counted(source, policy: FramePolicy, what: str, n: int, duration: float | None) -> Frames:
    picks = uniform_indices(n, policy.num_frames)
    kept, _ = _decode(source, picks, policy, what)
    return Frames([im for im, _ in kept], _stamps(kept), picks, n, duration)


def _stamps(kept: list) -> list[float] | None:
    """The kept frames' timestamps; None when a frame has no PTS (a raw elementary stream): never guessed."""
    stamps = [t for _, t in kept]
    return None if None in stamps else stamps


def _video_stream(container, what: str):
    if not container.streams.video:
        raise BadSample("video", f"{what}: no video stream")
    stream = container.streams.video[0]
    _check_size(stream.codec_context.width, stream.codec_context.height, what)
    return stream


def _check_size(w: int, h: int, what: str) -> None:
    cap = min(MAX_FRAME_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_FRAME_PIXELS)
    if w * h > cap:
        raise BadSample("video", f"{what}: frames of {w}x{h} pixels exceed the limit of {cap} (a decompression bomb?)")


def _stated_frames(stream) -> int:
    """The frame count the container states (MP4's sample table), 0 when it states none (Matroska, AVI)."""
    return int(stream.frames or 0)


def _duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        import av

        return container.duration / av.time_base
    return None


def _packet_times(container, stream) -> list[float | None]:
    """Every frame's presentation time (s) from the packets alone (demuxed, not decoded), ascending; None
    for a packet without PTS (a raw H.264 stream has none). The frame count of a container that does not
    state it (Matroska, AVI), and the instants fps sampling needs."""
    times = [None if p.pts is None else float(p.pts * stream.time_base) for p in container.demux(stream) if p.size]
    return times if None in times else sorted(times)  # packets come in decode order


def _decoded_times(source, what: str) -> list[float]:
    """Every frame's presentation time (s), decoding the whole stream (packets without PTS, fps sampling)."""
    with _open(source) as container:
        times = [_frame_time(frame) for frame in container.decode(_video_stream(container, what))]
    if None in times:
        raise BadSample("video", f"{what}: frames without presentation timestamps (fps sampling needs them)")
    return times


def _frame_time(frame) -> float | None:
    if frame.pts is None or frame.time_base is None:
        return None
    return float(frame.pts * frame.time_base)


def _decode(source, picks: list[int], policy: FramePolicy, what: str):
    """((image, timestamp) of each picked index, frames decoded): decoding stops after the last pick,
    and only the picked frames are kept."""
    kept: list[tuple[Image.Image, float | None]] = []
    wanted, last, decoded = set(picks), picks[-1], 0
    with _open(source) as container:
        for index, frame in enumerate(container.decode(_video_stream(container, what))):
            decoded = index + 1
            _check_size(frame.width, frame.height, what)  # a stream may change size after its header
            if index in wanted:
                kept.append((_fit(frame.to_image(), policy.max_pixels), _frame_time(frame)))
            if index == last:
                break
    return kept, decoded
