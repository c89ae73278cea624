"""Test videos written by PyAV."""

from __future__ import annotations

import io

import numpy as np


def lossless_mp4(frames: list[np.ndarray], rate: int = 10) -> bytes:
    """An MP4 of ``frames`` (uint8 [H, W, 3], one size) at ``rate`` frames a second: x264 lossless in YUV
    4:4:4, so the decoded RGB is within 2 of what was written."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.options = "yuv444p", {"qp": "0"}
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
