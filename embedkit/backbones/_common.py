"""Helpers shared by the backbone adapters' chunk processing: right padding, Qwen's chat frame, the
placeholder error. (The shared constructor pieces are in ``base``; checkpoint loading is
``backbones.checkpoints``.)

Not a component (the leading underscore keeps the registry from importing it as one).
"""

from __future__ import annotations

import torch

from embedkit.backbones.base import IMAGE_PLACEHOLDER

#: Qwen's chat markers (ChatML): the Qwen2 tokenizers of LLaVA-OneVision and Qwen2-VL hold both as special tokens
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chat_frame(ids, system: str) -> tuple[list[int], list[int]]:
    """The token ids before and after one user turn in Qwen's chat template, as LLaVE builds them
    (DeepLearnXMU/LLaVE @ 2c23053, llava/train/train.py ``preprocess_qwen``; pieces tokenized apart,
    "\n" its own token)::

        <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n  ...user content...
        <|im_end|>\n<|im_start|>assistant\n\n<|im_end|>\n

    The assistant turn is a lone "\n", so the last token, the state last-token pooling reads, is the
    "\n" after the final ``<|im_end|>``. ``ids(text)`` tokenizes without special tokens."""
    start, end, nl = ids(IM_START), ids(IM_END), ids("\n")
    before = start + ids("system") + nl + ids(system) + end + nl + start + ids("user") + nl
    after = end + nl + start + ids("assistant") + nl + nl + end + nl
    return before, after


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id rows: ``(input_ids [B, T], attention_mask [B, T])``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def placeholder_error(family: str) -> ValueError:
    return ValueError(f"{family}: an item's text contains {IMAGE_PLACEHOLDER} but the item has no image")
