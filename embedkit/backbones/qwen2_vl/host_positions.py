"""Qwen2-VL's integer work of a forward, done on the host: position ids and vision bookkeeping.

What Qwen2-VL's forward computes from the integer inputs -- the language model's M-RoPE position ids
(``get_rope_index``: a Python loop over the chunk's rows with several host syncs per row and per image),
the vision tower's rotary positions and ``cu_seqlens``, where the image and video features go, the image grouping
of the batched vision attention -- the chunk processor computes on the CPU, in the DataLoader workers
(``host_inputs``). The adapter's forward then runs the vision tower, writes its features into the token
embeddings at the known positions and calls the model with the position ids given: no host sync in the
vision path or the position ids, the same outputs (``tests/training/test_host_sync.py``). The full path is Qwen2-VL
only; the ``qwen2_5_vl`` family uses ``rope_positions`` alone (its vision tower keeps transformers' forward).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from embedkit.backbones.qwen2_vl.vision_attention import image_groups

#: the chunk keys ``host_inputs`` adds (``forward`` takes the prepared path when the first is present)
HOST_KEYS = ("rope_position_ids", "vision_cu_seqlens", "vision_position_ids", "visual_token_index", "vision_groups",
             "vision_order")


@functools.lru_cache(maxsize=256)
def _image_rope(t: int, h: int, w: int, merge: int, interval: float = 1.0) -> np.ndarray:
    """M-RoPE ids of one image's tokens relative to its first position, [3, t * h/m * w/m]: temporal,
    height and width index of each merged patch (row-major over t, h, w). ``interval``: the temporal
    index of temporal patch k is ``int(k * interval)``, in float32 as transformers' Qwen2.5-VL
    ``get_vision_position_ids`` (``(arange(t) * time_interval).long()``); 1 for Qwen2-VL and images."""
    gh, gw = h // merge, w // merge
    temporal = (np.arange(t, dtype=np.float32) * np.float32(interval)).astype(np.int64)
    tt, hh, ww = np.meshgrid(temporal, np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()])


@functools.lru_cache(maxsize=256)
def vision_rope(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """The vision tower's rotary (row, column) of each patch of one image, [t * h * w, 2], in the
    tower's order: merge x merge blocks, row-major inside and across blocks, repeated per frame."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).ravel()
    cols = cols.reshape(block).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([rows, cols], axis=1), (t, 1))


def rope_positions(input_ids: torch.Tensor, token_types: torch.Tensor, attention_mask: torch.Tensor,
                   grids: dict[int, list[list[int]]], merge: int) -> torch.Tensor:
    """M-RoPE position ids [3, B, S] of a chunk (Qwen2-VL, arXiv 2409.12191 sec. 2.1), as the model's
    ``get_rope_index`` makes them: over each row's real tokens, a run of text tokens counts on from the
    current position on all three axes; a visual's tokens (the next grid ``(t, h, w)`` of its kind in
    ``grids``: 1 images, 2 videos, each in order) take ``current + (t, h/m, w/m)`` indices (a video's
    temporal index is its temporal grid index: Qwen2-VL's ``get_vision_position_ids`` with interval 1),
    and the text after it starts at ``current + max(h, w)/m``. Padding gets 0. Raises if a run of visual
    tokens does not match its visual's token count. A grid may carry a fourth entry, its temporal interval
    (Qwen2.5-VL's ``tokens_per_second * second_per_grid_ts``, arXiv 2502.13923 sec. 2.1.3 "absolute time
    encoding"; ``_image_rope``)."""
    ids = input_ids.numpy()
    kinds_all, mask = token_types.numpy(), attention_mask.numpy().astype(bool)
    out = np.zeros((3, *ids.shape), dtype=np.int64)
    visuals = {kind: iter(g) for kind, g in grids.items()}
    for b in range(ids.shape[0]):
        where = np.flatnonzero(mask[b])
        row = _row_positions(kinds_all[b, where], visuals, merge)
        if row:
            out[:, b, where] = np.concatenate(row, axis=1)
    return torch.from_numpy(out)


def _row_positions(kinds: np.ndarray, visuals: dict, merge: int) -> list[np.ndarray]:
    """One row's position blocks (``rope_positions``), over its real tokens' types ``kinds``."""
    starts = np.flatnonzero(np.diff(kinds, prepend=kinds[:1] - 1)) if len(kinds) else []
    ends = list(starts[1:]) + [len(kinds)]
    row, current = [], 0
    for a, e in zip(starts, ends):
        if kinds[a] == 0:
            row.append(np.broadcast_to(np.arange(e - a) + current, (3, e - a)))
            current += e - a
            continue
        t, h, w, *interval = next(visuals[int(kinds[a])])
        block = _image_rope(int(t), int(h), int(w), merge, *interval)
        if block.shape[1] != e - a:
            raise ValueError(f"qwen2_vl: {e - a} visual tokens in a row, but its grid has {block.shape[1]}")
        row.append(block + current)
        current += max(h, w) // merge
    return row


def host_inputs(inputs: dict[str, torch.Tensor], merge_size: int) -> dict[str, Any]:
    """From a processed chunk with images and/or videos (CPU tensors), what Qwen2-VL's forward would
    compute on the device with host syncs, for one vision-tower pass over the image patches followed by
    the video patches (``pixel_values`` then ``pixel_values_videos``): ``rope_position_ids`` [3, B, S]
    (``rope_positions``), ``vision_cu_seqlens`` (int32 boundaries of every frame of every image, then
    video) and ``vision_position_ids`` [patches, 2] (the tower's rotary positions),
    ``visual_token_index`` (flat positions of the image tokens, in order, then of the video tokens: where
    the tower's output rows go), ``vision_groups`` / ``vision_order`` (``image_groups``, for the batched
    vision attention). Equal to transformers' own (``tests/training/test_host_sync.py``,
    ``tests/backbones/test_qwen2_vl_video.py``); numpy, cached per shape, since it runs in the DataLoader
    workers for every chunk."""
    grids = {1: inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else [],
             2: inputs["video_grid_thw"].tolist() if "video_grid_thw" in inputs else []}
    every = grids[1] + grids[2]
    types = inputs["mm_token_type_ids"].reshape(-1)
    frames = [h * w for t, h, w in every for _ in range(t)]  # one attention segment per frame
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(frames)]).astype(np.int32))
    groups, order = image_groups(cu)
    vision = np.concatenate([vision_rope(t, h, w, merge_size) for t, h, w in every])
    out: dict[str, Any] = {
        "rope_position_ids": rope_positions(inputs["input_ids"], inputs["mm_token_type_ids"],
                                            inputs["attention_mask"], grids, merge_size),
        "vision_cu_seqlens": cu, "vision_position_ids": torch.from_numpy(vision),
        "visual_token_index": torch.cat([(types == 1).nonzero().squeeze(1), (types == 2).nonzero().squeeze(1)]),
        "vision_groups": [list(g) for g in groups],
    }
    if order is not None:
        out["vision_order"] = order
    return out
