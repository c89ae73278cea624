"""Qwen2.5-VL (arXiv 2502.13923), registered as backbone ``qwen2_5_vl``: Qwen2-VL's chunk processing
(images, several images, videos from ``video_pixels``) with Qwen2.5-VL's M-RoPE position ids made on the host.

Qwen2.5-VL's language-model positions differ from Qwen2-VL's in one place: a video's temporal index of
temporal patch k is ``int(k * tokens_per_second * second_per_grid_ts)`` ("absolute time encoding", paper
sec. 2.1.3; transformers 5.25 ``Qwen2_5_VLModel.get_rope_index``), so temporal ids follow seconds, not
frame counts. The chunk processor computes them (``rope_positions`` with each video's interval) and adds
them as ``position_ids`` [3, B, S]: the model then skips its own ``get_rope_index`` (a Python loop with
host syncs per row and visual). ``mm_token_type_ids`` is in every chunk too: without it and without
``position_ids`` Qwen2.5-VL silently falls back to 1-D positions (qwen-vl-backbones.md sec. 3.3, probe B).

``second_per_grid_ts`` (``seconds_per_grid``) comes from the video's ``Frames.timestamps``: the seconds one
temporal patch spans, ``temporal_patch_size / fps`` (Qwen2.5-VL's processor) with fps the kept frames'
rate, i.e. ``temporal_patch_size * (t_last - t_first) / (n - 1)``. Without timestamps (a frame list, a
stream without PTS), with one frame or with non-increasing timestamps it is ``DEFAULT_SECONDS_PER_GRID``
= 1.0, transformers' own value when ``second_per_grid_ts`` is not given (``get_rope_index``), which is also
``temporal_patch_size`` 2 over 2 fps.

Out of scope: the vision tower keeps transformers' forward (its window-attention bookkeeping,
``get_window_index`` and ``cu_seqlens``, syncs the host per chunk); only the language model's positions are
prepared. Text-only chunks need no ``position_ids``: the model's default 1-D positions equal
``get_rope_index``'s on the real tokens of right-padded rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from embedkit.backbones.base import ChunkProcessor
from embedkit.backbones.qwen2_vl.adapter import (
    Qwen2VLBackbone,
    Qwen2VLChunkProcessor,
    tiny_text_config,
    vision_token_ids,
)
from embedkit.backbones.qwen2_vl.host_positions import rope_positions
from embedkit.config.registry import register
from embedkit.data.schema import Frames, Item

FAMILY = "qwen2_5_vl"
#: seconds per temporal patch without usable timestamps (transformers' default in ``get_rope_index``)
DEFAULT_SECONDS_PER_GRID = 1.0


def seconds_per_grid(frames: Frames, temporal_patch_size: int) -> float:
    """A video's ``second_per_grid_ts``: ``temporal_patch_size`` x the mean spacing of its kept frames'
    timestamps (= temporal_patch_size / fps); ``DEFAULT_SECONDS_PER_GRID`` without timestamps, with one
    frame or with a non-positive span (module docstring)."""
    stamps = frames.timestamps
    if not stamps or len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return DEFAULT_SECONDS_PER_GRID
    return temporal_patch_size * (stamps[-1] - stamps[0]) / (len(stamps) - 1)


class Qwen25VLChunkProcessor(Qwen2VLChunkProcessor):
    """Items -> Qwen2.5-VL inputs: ``Qwen2VLChunkProcessor``'s, plus for a chunk with a video
    ``second_per_grid_ts`` [videos] (float32) and for a chunk with any visual ``position_ids`` [3, B, S]
    (module docstring). ``tokens_per_second``: the model's ``vision_config.tokens_per_second``."""

    def __init__(self, *args, tokens_per_second: int, **kwargs):
        super().__init__(*args, host_positions=False, **kwargs)
        self.tokens_per_second = tokens_per_second

    @classmethod
    def extending(cls, processor: Qwen2VLChunkProcessor, tokens_per_second: int) -> "Qwen25VLChunkProcessor":
        """``processor``'s settings, whatever keys the ``qwen2_vl`` family gives it (prompt layouts
        included), with Qwen2.5-VL's positions added: the family keeps one place for its keys."""
        out = cls.__new__(cls)
        out.__dict__.update(vars(processor), host_positions=False, tokens_per_second=tokens_per_second)
        return out

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        out = super().__call__(items)
        grids = {1: out["image_grid_thw"].tolist() if "image_grid_thw" in out else [], 2: []}
        if "video_grid_thw" in out:
            temporal = self.image_processor.temporal_patch_size
            seconds = [seconds_per_grid(it.video, temporal) for it in items if it.video is not None]
            out["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
            # float32 as transformers: tokens_per_second * second_per_grid_ts[k]
            intervals = (self.tokens_per_second * out["second_per_grid_ts"]).tolist()
            grids[2] = [[*g, i] for g, i in zip(out["video_grid_thw"].tolist(), intervals)]
        if grids[1] or grids[2]:
            out["position_ids"] = rope_positions(out["input_ids"], out["mm_token_type_ids"], out["attention_mask"],
                                                 grids, self.merge_size)
        return out


@register("backbone", FAMILY)
class Qwen25VLBackbone(Qwen2VLBackbone):
    """Qwen2.5-VL adapter (``qwen2_vl``'s keys and behaviour; module docstring for the positions).
    ``tiny=true`` builds a small random ``Qwen2_5_VLModel`` with window attention (window 56 px, the last
    vision block full attention); ``path`` must hold a ``qwen2_5_vl`` checkpoint (jina-embeddings-v4's base,
    Qwen2.5-VL-3B/7B-Instruct). LoRA targets the language model only: the anchored ``lora_target`` leaves
    the vision MLP's ``gate/up/down_proj`` alone (qwen-vl-backbones.md sec. 4 pitfall 8)."""

    family, model_types = FAMILY, (FAMILY,)

    @staticmethod
    def _tiny_model(tokenizer, hidden: int, layers: int, vision_layers: int, attn_implementation: str):
        return _tiny_model(tokenizer, hidden, layers, vision_layers, attn_implementation)

    def make_processor(self) -> ChunkProcessor:
        return Qwen25VLChunkProcessor.extending(super().make_processor(),
                                                self.model.config.vision_config.tokens_per_second)


def _tiny_model(tokenizer, hidden: int, layers: int, vision_layers: int, attn_implementation: str,
                window_size: Optional[int] = 56):
    """A small random Qwen2.5-VL (the config of qwen-vl-backbones.md sec. 3.4, sized by ``hidden``): window
    attention over 56 px windows (2 x 2 merged tokens) in every vision block but the last (full
    attention), ``tokens_per_second`` 2 so that video temporal ids are scaled."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    config = Qwen2_5_VLConfig(
        text_config=tiny_text_config(tokenizer, hidden, layers, rope_theta=1e6),
        vision_config=dict(depth=vision_layers, hidden_size=hidden // 2, intermediate_size=hidden, num_heads=2,
                           out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=window_size, fullatt_block_indexes=[vision_layers - 1], tokens_per_second=2),
        **vision_token_ids(tokenizer),
    )
    config._attn_implementation = attn_implementation
    return Qwen2_5_VLModel(config)
