"""Qwen3-VL's chunk processing: items -> ``Qwen3VLModel`` inputs without torchvision.

- **Pixels**: images through the PIL image processor (``Qwen2VLImageProcessorPil`` with patch 16, merge 2,
  mean = std = 0.5: the Qwen3-VL checkpoints' ``preprocessor_config``), videos through qwen2_vl's
  ``video_pixels`` with that processor (its patch size and merge size are read from the processor, so
  the 32-px factor and the ``C * t * 16 * 16`` patch width follow; one frame size per video, an odd frame
  count padded with the last frame).
- **Tokens**: an image is ``<|vision_start|>`` + N x ``<|image_pad|>`` + ``<|vision_end|>`` with N = h * w /
  merge^2; a video is written as Qwen3-VL's processor writes it (``processing_qwen3_vl.py``,
  ``replace_video_token``): per temporal patch a text timestamp ``<{t:.1f} seconds>`` followed by
  ``<|vision_start|>`` + (h * w / merge^2) x ``<|video_pad|>`` + ``<|vision_end|>``.
- **Timestamps** (``timestamps``): the temporal patch's time is the mean of its first and last frame's
  time (``_calculate_timestamps``), the frame count padded with the last frame first. A frame's time is
  ``Frames.timestamps``; when those are None, ``index / fps`` with fps = ``source_frames / duration``;
  when the duration is unknown too, transformers' own fallback, 24 fps on the frame indices (it warns
  "Defaulting to fps=24"). docs/qwen3-vl.md.
- **Template** (``system``): None keeps the raw layout (the content, then ``end``); a string wraps the
  item in Qwen's chat template as Qwen3-VL-Embedding renders it (``apply_chat_template(...,
  add_generation_prompt=True)``, QwenLM/Qwen3-VL-Embedding @ 8ce3aab ``src/models/qwen3_vl_embedding.py``;
  research note qwen-vl-backbones.md sec. 1.2), then ``end`` (the embedder appends ``<|endoftext|>``, the
  token its pooling reads, TR p.4)::

      <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{visuals}{text}<|im_end|>\n<|im_start|>assistant\n{end}

- **Positions**: ``position_ids`` [3, B, S] for every chunk, computed here (``positions``): Qwen3-VL's
  ``get_rope_index`` (interleaving is the rotary's business, not the ids').
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from embedkit.backbones._common import IM_END, IM_START, qwen_token_inputs
from embedkit.backbones.qwen2_vl.adapter import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, Qwen2VLChunkProcessor
from embedkit.backbones.qwen2_vl.host_positions import rope_positions
from embedkit.backbones.qwen2_vl.video_pixels import video_grid
from embedkit.data.schema import Frames, Item, Segment, segments

#: transformers' fallback frame rate when a video has no timestamps and no duration (processing_qwen3_vl.py)
FALLBACK_FPS = 24.0


def timestamps(frames: Frames, temporal: int) -> list[float]:
    """One time (seconds) per temporal patch of ``frames``: the mean of the patch's first and last frame's
    time, the frames padded to a multiple of ``temporal`` with the last (Qwen3-VL's ``_calculate_timestamps``).
    Frame times: ``frames.timestamps``, else ``indices / (source_frames / duration)``, else ``indices / 24``."""
    if frames.timestamps is not None:
        times = [float(t) for t in frames.timestamps]
    else:
        fps = frames.source_frames / frames.duration if frames.duration else FALLBACK_FPS
        times = [i / fps for i in frames.indices]
    times = times + [times[-1]] * (-len(times) % temporal)
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


def video_text(stamps: list[float], frame_tokens: int) -> str:
    """A video's text: per temporal patch ``<{t:.1f} seconds>`` + one frame's vision block."""
    block = VISION_START + VIDEO_PAD * frame_tokens + VISION_END
    return "".join(f"<{t:.1f} seconds>" + block for t in stamps)


def chat(content: str, system: str) -> str:
    """``content`` as the user turn of Qwen's chat template with ``system`` as the system message and the
    generation prompt (module docstring, "Template"); the appended token is the caller's."""
    return f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"


def positions(chunk: dict[str, torch.Tensor], merge: int) -> torch.Tensor:
    """Qwen3-VL's M-RoPE position ids [3, B, S] of a processed chunk, on the host: ``get_rope_index``
    with each video's grid split into ``t`` frames of ``(1, h, w)`` (timestamps separate them), which is
    qwen2_vl's ``rope_positions`` over those grids (text: one index on all three axes; a visual: its
    ``(t, h/m, w/m)`` offsets from the current index, the text after it at ``current + max(h, w)/m``)."""
    images = chunk["image_grid_thw"].tolist() if "image_grid_thw" in chunk else []
    videos = chunk["video_grid_thw"].tolist() if "video_grid_thw" in chunk else []
    frames = [[1, h, w] for t, h, w in videos for _ in range(t)]
    return rope_positions(chunk["input_ids"], chunk["mm_token_type_ids"], chunk["attention_mask"],
                          {1: images, 2: frames}, merge)


class Qwen3VLChunkProcessor(Qwen2VLChunkProcessor):
    """Items -> Qwen3-VL inputs (module docstring): qwen2_vl's pixels, Qwen3-VL's video text, the chat
    template when ``system`` is set, ``mm_token_type_ids`` and host ``position_ids``."""

    def __init__(self, tokenizer, image_processor, merge_size: int, max_length: int, append_eos: bool = True,
                 resize: Optional[list[int]] = None, video: Optional[tuple[int, int, Optional[int]]] = None,
                 system: Optional[str] = None, append_token: Optional[str] = None,
                 candidate_system: Optional[str] = None):
        super().__init__(tokenizer, image_processor, merge_size, max_length, append_eos=append_eos,
                         resize=resize, host_positions=False, video=video)
        self.system = system  # None: no chat template
        self.candidate_system = candidate_system  # the candidate side's system message (None: ``system``)
        self.end = (append_token or tokenizer.eos_token) if append_eos else ""

    def for_side(self, side: Optional[str]) -> "Qwen3VLChunkProcessor":
        """A copy with ``candidate_system`` as the system message for the candidate side (Qwen3-VL-Embedding:
        a query's task instruction, the default instruction for documents); ``self`` otherwise."""
        if side != "candidate" or self.candidate_system is None or self.system is None:
            return self
        out = copy.copy(self)
        out.system, out.candidate_system = self.candidate_system, None
        return out

    def _render(self, item: Item, segs: list[Segment], counts: dict) -> str:
        """An item's text, its visuals' tokens in place (``counts``: iterators over the token counts of the
        chunk's images and video frames, in token order), in the template when ``system`` is set."""
        parts = []
        for kind, value in segs:
            if kind == "text":
                parts.append(value)
            elif kind == "image":
                parts.append(VISION_START + IMAGE_PAD * next(counts["image"]) + VISION_END)
            else:
                stamps = timestamps(item.video, self.image_processor.temporal_patch_size)
                parts.append(video_text(stamps, next(counts["video"])))
        content = "".join(parts)
        return (content if self.system is None else chat(content, self.system)) + self.end

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        segs = [segments(it) for it in items]
        out, image_counts, video_counts = self._visuals(items, segs)
        grids = out["video_grid_thw"].tolist() if video_counts else []
        counts = {"image": iter(image_counts), "video": iter([h * w // self.merge_size**2 for _, h, w in grids])}
        texts = [self._render(it, s, counts) for it, s in zip(items, segs)]
        # with transformers 5's token types (Qwen3-VL raises without them)
        out.update(qwen_token_inputs(self.tokenizer, texts, self.max_length, self.image_token_id, self.video_token_id))
        out["position_ids"] = positions(out, self.merge_size)
        return out

    def num_tokens(self, item: Item) -> int:
        """The processed length by arithmetic: the item rendered with one pad per visual (or frame), tokenized
        (timestamps and template included, tokenized as ``__call__`` does), plus each visual's other pads
        from its size (and frame count)."""
        segs = segments(item)
        counts = {"image": iter([1] * len(item.images)), "video": iter([1])}
        n = len(self.tokenizer(self._render(item, segs, counts), add_special_tokens=False)["input_ids"])
        for kind, value in segs:
            if kind == "image":
                width, height = self.resize or item.images[value].size
                n += self.image_processor.get_number_of_image_patches(height, width) // self.merge_size**2 - 1
            elif kind == "video":
                width, height = item.video.images[0].size
                t, h, w = video_grid(width, height, len(item.video.images), self.image_processor, *self.video)
                n += t * (h * w // self.merge_size**2 - 1)
        return n
