"""Qwen2-VL / Qwen2.5-VL, registered as backbones ``qwen2_vl`` and ``qwen2_5_vl``.

- ``adapter``: the backbone adapter (model, chunk processor, forward) and its PEFT module-name map;
- ``qwen2_5_vl``: Qwen2.5-VL's backbone (``qwen2_vl``'s processing, its own host position ids);
- ``host_positions``: Qwen2-VL's M-RoPE position ids and vision bookkeeping, computed on the host;
- ``vision_attention``: the vision tower's attention with the images of one size in one SDPA call.

Importing the package registers the backbone (the registry imports ``embedkit.backbones.<name>``).
"""

from embedkit.backbones.qwen2_vl.adapter import FAMILY, Qwen2VLBackbone, Qwen2VLChunkProcessor, peft_module_name
from embedkit.backbones.qwen2_vl.host_positions import HOST_KEYS, host_inputs, rope_positions
from embedkit.backbones.qwen2_vl.qwen2_5_vl import Qwen25VLBackbone, Qwen25VLChunkProcessor, seconds_per_grid
from embedkit.backbones.qwen2_vl.vision_attention import (
    batched_vision_attention,
    image_groups,
    use_batched_vision_attention,
)

__all__ = [
    "FAMILY", "HOST_KEYS", "Qwen25VLBackbone", "Qwen25VLChunkProcessor", "Qwen2VLBackbone", "Qwen2VLChunkProcessor",
    "batched_vision_attention", "host_inputs", "image_groups", "peft_module_name", "rope_positions",
    "seconds_per_grid", "use_batched_vision_attention",
]
