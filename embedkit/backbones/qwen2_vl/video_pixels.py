"""Qwen2-VL's video pixels, built from a video's frames with the PIL image processor (no torchvision).

transformers' ``Qwen2VLVideoProcessor`` needs torchvision, which is not installed here, so a video is
made of what the image processor already does for an image:

- **Frame size** (``frame_size``): every frame takes the first frame's size (VLM2Vec-V2's processor
  resizes all frames to the first one's, mmeb-v2.md section 2), then ``smart_resize`` with factor
  ``patch * merge`` between ``min_pixels`` and the frame cap (``frame_cap``).
- **Frame cap** (``frame_cap``, of the padded frame count): ``max_pixels``; with a per-video budget ``total_pixels`` it is
  qwen-vl-utils' ``fetch_video`` rule (``vision_process.py``, Qwen2-VL repository)
  ``max(min(max_pixels, total_pixels / frames * 2), min_pixels * 1.05)`` (2 = ``FRAME_FACTOR``, the
  frames of one temporal patch), so a long video's frames shrink instead of the sequence growing.
- **Padding**: an odd frame count is padded to a multiple of ``temporal_patch_size`` (2) by repeating
  the last frame (Qwen2-VL's processor, mmeb-v2.md section 2): 7 frames give ``grid_t`` 4.
- **Layout**: the image processor turns each frame into its patches ``[h * w, C * t * p * p]`` with the
  frame copied into all ``t`` temporal slots; a video patch is the ``t`` frames of one temporal group in
  those slots, rows ordered temporal group first, then the image's own (merge-block) order -- the layout of
  Qwen2-VL's video processor (``(grid_t, h/m, w/m, m, m, C, t, p, p)`` flattened). So a video of one
  repeated image gives exactly the image processor's output for that image, tiled ``grid_t`` times
  (``tests/backbones/test_qwen2_vl_video.py``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image

#: qwen-vl-utils' FRAME_FACTOR: frames per temporal patch, the factor of the per-frame budget
FRAME_FACTOR = 2


def frame_cap(frames: int, min_pixels: int, max_pixels: int, total_pixels: Optional[int]) -> int:
    """The most pixels of one frame of a ``frames``-frame video: ``max_pixels``, or with a budget
    qwen-vl-utils' ``max(min(max_pixels, total_pixels / frames * 2), min_pixels * 1.05)`` (truncated to an
    int as ``fetch_video`` does for the floor)."""
    if total_pixels is None:
        return max_pixels
    return int(max(min(max_pixels, total_pixels / frames * FRAME_FACTOR), int(min_pixels * 1.05)))


def video_grid(width: int, height: int, frames: int, image_processor, min_pixels: int, max_pixels: int,
               total_pixels: Optional[int]) -> tuple[int, int, int]:
    """``(grid_t, grid_h, grid_w)`` of a ``frames``-frame video whose first frame is ``width x height``:
    by arithmetic, what ``video_pixels`` gives (``num_tokens`` = t * h * w / merge^2)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    patch, merge, temporal = (image_processor.patch_size, image_processor.merge_size,
                              image_processor.temporal_patch_size)
    grid_t = math.ceil(frames / temporal)
    cap = frame_cap(grid_t * temporal, min_pixels, max_pixels, total_pixels)  # of the padded count
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=cap)
    return grid_t, h // patch, w // patch


def video_pixels(frames: Sequence[Image.Image], image_processor, min_pixels: int, max_pixels: int,
                 total_pixels: Optional[int]) -> tuple[np.ndarray, list[int]]:
    """A video's ``pixel_values_videos`` rows [grid_t * h * w, C * t * p * p] and its grid ``[t, h, w]``.

    ``frames``: RGB PIL images (``data.video.Frames.images``), at least one. Resized, rescaled and
    normalised by ``image_processor`` (a ``Qwen2VLImageProcessorPil``) with the frame cap as its
    ``longest_edge``; see the module docstring for the padding and the layout."""
    (rows, grid), = videos_pixels([frames], image_processor, min_pixels, max_pixels, total_pixels)
    return rows, grid


def _padded(frames: Sequence[Image.Image], temporal: int) -> list[Image.Image]:
    """Every frame at the first one's size, the count padded to a multiple of ``temporal`` with the last."""
    first = frames[0].size
    frames = [f if f.size == first else f.resize(first, Image.Resampling.BICUBIC) for f in frames]
    return frames + [frames[-1]] * (-len(frames) % temporal)


def videos_pixels(videos: Sequence[Sequence[Image.Image]], image_processor, min_pixels: int, max_pixels: int,
                  total_pixels: Optional[int]) -> list[tuple[np.ndarray, list[int]]]:
    """``video_pixels`` of several videos, in their order. The videos whose frames share a size and a cap
    go through the image processor in ONE call: for short clips its per-call cost, not the pixels,
    dominates (bench/video.py: one call per video held the loader below the model's rate)."""
    temporal = image_processor.temporal_patch_size
    padded = [_padded(list(frames), temporal) for frames in videos]
    groups: dict[tuple, list[int]] = {}
    for i, frames in enumerate(padded):
        cap = frame_cap(len(frames), min_pixels, max_pixels, total_pixels)
        groups.setdefault((frames[0].size, cap), []).append(i)
    out: list = [None] * len(videos)
    for (_, cap), members in groups.items():
        processed = image_processor(images=[f for i in members for f in padded[i]],
                                    size={"shortest_edge": min_pixels, "longest_edge": cap}, return_tensors="np")
        _, gh, gw = (int(x) for x in processed["image_grid_thw"][0])
        rows = processed["pixel_values"].reshape(-1, gh * gw, processed["pixel_values"].shape[1])  # per frame
        at = 0
        for i in members:
            n = len(padded[i])
            out[i] = (_video_rows(rows[at:at + n], image_processor), [n // temporal, gh, gw])
            at += n
    return out


def _video_rows(frame_rows: np.ndarray, image_processor) -> np.ndarray:
    """[frames, h * w, C * t * p * p] rows of single frames (each copied into the t temporal slots by the
    image processor) -> the video's rows: slot 0 of each frame kept, the t frames of a temporal group put
    in the t slots, temporal group first (module docstring, "Layout")."""
    temporal = image_processor.temporal_patch_size
    n, hw, width = frame_rows.shape
    channels = width // (temporal * image_processor.patch_size**2)
    per_frame = frame_rows.reshape(n, hw, channels, temporal, -1)[:, :, :, 0]
    groups = per_frame.reshape(n // temporal, temporal, hw, channels, -1)
    return np.ascontiguousarray(groups.transpose(0, 2, 3, 1, 4).reshape(-1, width))
