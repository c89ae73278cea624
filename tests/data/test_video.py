"""Video decoding by a frame policy (embedkit/data/video.py): every video here is written by PyAV in the test,
64x48, a moving square so frames differ; lossless (FFV1 RGB in Matroska) unless a test says otherwise."""

from __future__ import annotations

import io
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from embedkit.data import video
from embedkit.data.shards import SKIP_REASONS, BadSample
from embedkit.data.video import FramePolicy, fps_indices, frames_from_images, read_video, uniform_indices
from embedkit.errors import ConfigError


def _pixels(i: int) -> np.ndarray:
    """Frame i: a flat background and an 8x8 square that moves 3 pixels a frame, its colour by i."""
    a = np.zeros((48, 64, 3), np.uint8)
    a[:, :] = (20, 40, 60)
    x = (i * 3) % 56
    a[10:18, x:x + 8] = (255, 200, (i * 6) % 256)
    return a


def _write(times_ms: list[int], fmt: str = "matroska", codec: str = "ffv1", size=(64, 48)) -> bytes:
    """A video of frames 0..len(times_ms)-1 presented at ``times_ms`` (time base 1/1000 s); frames of
    another ``size`` are a flat colour."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height = size
        if codec == "ffv1":
            stream.pix_fmt = "bgr0"  # RGB, lossless
        else:
            stream.pix_fmt, stream.options = "yuv444p", {"qp": "0"}  # x264 lossless in YUV: RGB within 1 or 2
        if fmt == "matroska":
            stream.time_base = Fraction(1, 1000)
        for i, ms in enumerate(times_ms):
            pixels = _pixels(i) if size == (64, 48) else np.full((size[1], size[0], 3), 90, np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if fmt == "matroska":
                frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def _constant(n: int, start_ms: int = 0) -> bytes:
    return _write([start_ms + 100 * i for i in range(n)])  # 10 frames a second


def _same(frames, indices, tol=0):
    assert [im.size for im in frames.images] == [(64, 48)] * len(indices)
    for im, i in zip(frames.images, indices):
        assert im.mode == "RGB"
        assert np.abs(np.asarray(im, dtype=int) - _pixels(i)).max() <= tol, f"frame {i}"


# ---- the sampling rules, no decoder


def test_uniform_indices_are_the_benchmarks_floor_of_linspace_and_all_frames_when_fewer():
    for n in range(1, 70):
        for k in (1, 2, 3, 8, 16):
            want = list(range(n)) if n <= k else np.linspace(0, n - 1, k, dtype=int).tolist()
            assert uniform_indices(n, k) == want, (n, k)
    assert uniform_indices(20, 8) == [0, 2, 5, 8, 10, 13, 16, 19]
    assert uniform_indices(123, 15)[7] == 60  # NumPy's float step; exactly, 7 * 122 / 14 = 61


def test_fps_indices_take_the_first_frame_at_or_after_each_instant_and_thin_uniformly():
    times = [0.5, 0.6, 0.7, 1.0, 1.1, 1.5, 2.3]  # instants 0.5, 1.0, 1.5, 2.0 at 2 fps
    assert fps_indices(times, 2.0, 8) == [0, 3, 5, 6]
    assert fps_indices(times, 2.0, 3) == [0, 3, 6]  # four picks, three kept: floor(linspace(0, 3, 3))
    assert fps_indices(times, 100.0, 50) == list(range(7))  # faster than the video: each frame once
    assert fps_indices([0.0, 1 / 3, 2 / 3, 1.0], 3.0, 8) == [0, 1, 2, 3]  # float rounding of PTS


# ---- the policy


@pytest.mark.parametrize("kwargs,key", [
    ({"num_frames": 0}, "num_frames"), ({"num_frames": True}, "num_frames"), ({"num_frames": 2.0}, "num_frames"),
    ({"sampling": "random"}, "sampling"), ({"fps": 1.0}, "fps"), ({"sampling": "fps"}, "fps"),
    ({"sampling": "fps", "fps": -1}, "fps"), ({"sampling": "fps", "fps": float("nan")}, "fps"),
    ({"min_frames": 0}, "min_frames"), ({"max_pixels": 0}, "max_pixels"),
])
def test_a_bad_policy_is_a_one_line_error_naming_its_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"frame policy {key}:") as err:
        FramePolicy(**kwargs)
    assert "\n" not in str(err.value)


def test_a_policy_from_config_refuses_an_unknown_key_and_is_frozen():
    assert FramePolicy.from_config({"sampling": "fps", "fps": 2}) == FramePolicy(sampling="fps", fps=2)
    with pytest.raises(ConfigError, match="unknown key 'frames'"):
        FramePolicy.from_config({"frames": 8})
    with pytest.raises(AttributeError):
        FramePolicy().num_frames = 4


def test_the_video_reasons_are_skip_reasons_and_counted():
    from embedkit.training.data_skips import SkipCounts

    assert {"video", "video_short"} <= set(SKIP_REASONS)
    counts = SkipCounts()
    counts.add({"video": 2, "video_short": 1})
    totals = counts.totals("cpu")
    assert totals["video"] == 2 and totals["video_short"] == 1


def test_importing_the_module_does_not_import_pyav():
    code = "import sys, embedkit.data.video; assert 'av' not in sys.modules, 'av imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- decoding


def test_uniform_over_more_frames_than_asked_picks_floor_linspace_with_pts_timestamps():
    data = _constant(20, start_ms=500)  # no frame count in Matroska's header: the packets are counted
    frames = read_video(data, FramePolicy(num_frames=8))
    assert frames.indices == [0, 2, 5, 8, 10, 13, 16, 19]
    _same(frames, frames.indices)
    assert frames.timestamps == pytest.approx([0.5 + i / 10 for i in frames.indices])  # a non-zero start
    assert frames.source_frames == 20 and frames.duration == pytest.approx(2.5, abs=0.11)


def test_uniform_over_fewer_frames_than_asked_gives_all_of_them_unpadded():
    frames = read_video(_constant(5), FramePolicy(num_frames=8))
    assert frames.indices == [0, 1, 2, 3, 4] and len(frames.images) == 5
    _same(frames, range(5))


def test_an_mp4_stating_its_frame_count_is_sampled_from_the_header_count():
    data = _write([0] * 12, fmt="mp4", codec="libx264")
    frames = read_video(data, FramePolicy(num_frames=4))
    assert frames.indices == [0, 3, 7, 11] and frames.source_frames == 12
    _same(frames, frames.indices, tol=2)
    assert frames.timestamps == pytest.approx([i / 10 for i in frames.indices])


def test_a_raw_h264_stream_without_timestamps_is_sampled_by_index_and_refused_for_fps():
    data = _write([0] * 12, fmt="h264", codec="libx264")  # an elementary stream: no PTS on packets or frames
    frames = read_video(data, FramePolicy(num_frames=4))
    assert frames.indices == [0, 3, 7, 11] and frames.source_frames == 12 and frames.timestamps is None
    _same(frames, frames.indices, tol=2)
    err = _refused(data, FramePolicy(sampling="fps", fps=2))
    assert err.reason == "video" and "without presentation timestamps" in str(err)


def test_fps_sampling_of_a_variable_frame_rate_stream_uses_presentation_times():
    times_ms = [500, 600, 700, 1000, 1100, 1500, 2300]
    data = _write(times_ms)
    frames = read_video(data, FramePolicy(num_frames=8, sampling="fps", fps=2))
    assert frames.indices == [0, 3, 5, 6]
    assert frames.timestamps == pytest.approx([0.5, 1.0, 1.5, 2.3])
    _same(frames, frames.indices)
    thinned = read_video(data, FramePolicy(num_frames=3, sampling="fps", fps=2))
    assert thinned.indices == [0, 3, 6] and thinned.timestamps == pytest.approx([0.5, 1.0, 2.3])


def test_decoding_stops_after_the_last_picked_frame():
    kept, decoded = video._decode(_constant(20), [1, 4], FramePolicy(), "test")
    assert decoded == 5 and len(kept) == 2


def test_max_pixels_resizes_down_with_the_aspect_kept_and_rounds_down():
    frames = read_video(_constant(10), FramePolicy(num_frames=2, max_pixels=1000))
    # scale sqrt(1000 / 3072) = 0.5705: 64 -> 36.5 -> 36, 48 -> 27.4 -> 27 (972 pixels <= 1000)
    assert [im.size for im in frames.images] == [(36, 27), (36, 27)]
    assert read_video(_constant(3), FramePolicy(max_pixels=64 * 48)).images[0].size == (64, 48)


def test_bytes_and_a_path_give_the_same_frames(tmp_path):
    data = _constant(15)
    path = tmp_path / "clip.mkv"
    path.write_bytes(data)
    policy = FramePolicy(num_frames=6, max_pixels=2000)
    a, b = read_video(data, policy), read_video(path, policy)
    assert a.indices == b.indices and a.timestamps == b.timestamps and a.duration == b.duration
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))


@pytest.mark.parametrize("policy", [FramePolicy(num_frames=5, max_pixels=1500), FramePolicy(num_frames=3),
                                    FramePolicy(num_frames=4, sampling="fps", fps=2.5)])
def test_a_frame_list_and_a_video_of_those_frames_give_the_same_frames(policy):
    times_ms = [0, 100, 200, 400, 500, 600, 900, 1000, 1300, 1400, 1500, 1900]
    from_video = read_video(_write(times_ms), policy)
    images = [Image.fromarray(_pixels(i)) for i in range(len(times_ms))]
    from_list = frames_from_images(images, [ms / 1000 for ms in times_ms], policy)
    assert from_list.indices == from_video.indices and from_list.source_frames == from_video.source_frames
    assert from_list.timestamps == pytest.approx(from_video.timestamps)
    for x, y in zip(from_list.images, from_video.images):
        assert x.size == y.size and np.array_equal(np.asarray(x), np.asarray(y))


def test_a_frame_list_without_timestamps_samples_uniformly_and_refuses_fps():
    images = [Image.fromarray(_pixels(i)) for i in range(10)]
    frames = frames_from_images(images, policy=FramePolicy(num_frames=4))
    assert frames.indices == [0, 3, 6, 9] and frames.timestamps is None
    with pytest.raises(ValueError, match="needs the frames' timestamps"):
        frames_from_images(images, policy=FramePolicy(sampling="fps", fps=1))
    with pytest.raises(BadSample) as err:
        frames_from_images(images[:2], policy=FramePolicy(min_frames=3))
    assert err.value.reason == "video_short"


def _refused(source, policy: FramePolicy | None = None) -> BadSample:
    with pytest.raises(BadSample) as err:
        read_video(source, policy or FramePolicy())
    assert "\n" not in str(err.value)
    return err.value


def test_corrupt_empty_and_truncated_videos_are_refused_as_video(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    data = _constant(10)
    for source in (b"not a video" * 50, empty, b"", tmp_path / "missing.mkv", data[:120]):
        err = _refused(source)
        assert err.reason == "video", (source, str(err))


def test_a_video_with_fewer_frames_than_min_frames_is_refused_as_short():
    err = _refused(_constant(5), FramePolicy(min_frames=6))
    assert err.reason == "video_short" and "5 frames, fewer than min_frames=6" in str(err)
    assert len(read_video(_constant(6), FramePolicy(min_frames=6)).images) == 6


def test_frames_beyond_the_pixel_cap_are_refused_before_any_frame_is_decoded(monkeypatch):
    def no_decoding(*args):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(video, "_decode", no_decoding)
    small = _write([0, 100, 200], size=(256, 256))
    # the Matroska header's PixelWidth and PixelHeight (EBML ids B0 and BA, 2 bytes: 256) made 8448 (0x2100):
    # 71 million pixels a frame stated, 256x256 stored
    width, height = b"\xb0\x82\x01\x00", b"\xba\x82\x01\x00"
    assert small.count(width) == 1 and small.count(height) == 1
    bomb = small.replace(width, b"\xb0\x82\x21\x00").replace(height, b"\xba\x82\x21\x00")
    err = _refused(bomb)
    assert err.reason == "video" and "8448x8448" in str(err) and "limit of 67108864" in str(err)
    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", 64 * 48 - 1)  # the cap is the module's
    err = _refused(_constant(10))
    assert err.reason == "video" and "64x48" in str(err)


def test_a_stream_that_grows_past_the_cap_after_its_header_is_refused_when_the_big_frame_decodes(monkeypatch):
    # two raw H.264 streams back to back: the probe sees 64x48, frames 30.. are 256x256 (a new SPS)
    data = _write([0] * 30, fmt="h264", codec="libx264") + _write([0] * 3, fmt="h264", codec="libx264",
                                                                    size=(256, 256))
    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", 64 * 48 * 4)
    assert len(read_video(data, FramePolicy(num_frames=1)).images) == 1  # frame 0 only: never meets a big one
    err = _refused(data)
    assert err.reason == "video" and "256x256" in str(err)


def test_a_header_that_overstates_the_frame_count_is_sampled_from_the_frames_there_are(monkeypatch):
    monkeypatch.setattr(video, "_stated_frames", lambda stream: 20)  # 10 frames stored
    frames = read_video(_constant(10), FramePolicy(num_frames=4))
    assert frames.indices == [0, 3, 6, 9] and frames.source_frames == 10
    _same(frames, frames.indices)
    err = _refused(_constant(10), FramePolicy(min_frames=12))  # 20 stated passes the check, 10 decoded do not
    assert err.reason == "video_short"
