"""The backbone adapter contract.

A backbone adapter owns a transformers model and knows how to turn a chunk of ``Item``s into that
model's inputs. The two halves are separate objects because they live in different processes:

- ``Backbone.make_processor()`` returns a picklable ``ChunkProcessor``; the DataLoader workers call
  it on raw chunks ("late processing": VLM processors emit tensors that are not aligned on the batch
  axis, so the model never slices a processed batch).
- ``Backbone.forward(inputs)`` runs the model and returns ``BackboneOutput``: last-layer hidden
  states, the attention mask, and every layer's hidden states when a pooling head asks.

Adapters also declare their LoRA targets as one anchored regex over module names of the language
model only (``lora_target``), and freeze the vision tower unless asked (``freeze_vision=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from embedkit.data.schema import Item

IMAGE_PLACEHOLDER = "<|image_1|>"  # MMEB's image placeholder; each backbone swaps in its own token


@dataclass
class BackboneOutput:
    hidden: torch.Tensor  # [B, T, H] last layer
    mask: torch.Tensor  # [B, T] 1 for real tokens
    all_layers: tuple[torch.Tensor, ...] | None = None  # embeddings output + each layer, [B, T, H]


class ChunkProcessor:
    """Picklable: ``processor(items) -> dict of tensors`` for one forward pass."""

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def num_tokens(self, item: Item) -> int:
        """Sequence length of ``item`` once processed (token-budget chunking). Exact by default, by
        processing it; adapters override it with arithmetic on the image size where they can."""
        return int(self([item])["input_ids"].shape[1])


class Backbone(nn.Module):
    """Base class of backbone adapters; subclasses register with ``@register("backbone", name)``."""

    #: anchored regex over ``named_modules()`` names, language model only
    lora_target: str = ""
    #: module-name prefixes of the vision tower (frozen unless ``freeze_vision=False``)
    vision_prefixes: tuple[str, ...] = ()

    hidden_size: int
    num_layers: int

    def make_processor(self) -> ChunkProcessor:
        raise NotImplementedError

    def forward(self, inputs: dict[str, Any], output_all_layers: bool = False) -> BackboneOutput:
        raise NotImplementedError

    def freeze_vision_tower(self) -> None:
        for name, param in self.named_parameters():
            if any(name.startswith(p) for p in self.vision_prefixes):
                param.requires_grad_(False)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
