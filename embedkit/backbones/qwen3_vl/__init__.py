"""Qwen3-VL (dense), registered as backbone ``qwen3_vl``.

- ``adapter``: the backbone adapter (tiny form, checkpoint loading, forward, the dummy vision pass);
- ``processing``: the chunk processor (pixels, Qwen3-VL's video text with timestamps, the chat template of
  Qwen3-VL-Embedding, ``mm_token_type_ids``, host position ids).

Importing the package registers the backbone (the registry imports ``embedkit.backbones.<name>``).
"""

from embedkit.backbones.qwen3_vl.adapter import FAMILY, Qwen3VLBackbone
from embedkit.backbones.qwen3_vl.processing import Qwen3VLChunkProcessor, positions, timestamps

__all__ = ["FAMILY", "Qwen3VLBackbone", "Qwen3VLChunkProcessor", "positions", "timestamps"]
