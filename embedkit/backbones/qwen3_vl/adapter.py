"""Qwen3-VL (dense ``Qwen3VLModel``) as an embedding backbone; the base of Qwen3-VL-Embedding
(QwenLM/Qwen3-VL-Embedding technical report sec. 4.2).

What differs from Qwen2-VL (research note qwen-vl-backbones.md sec. 3.3): patch 16 (32 px per merged
token), images normalised with mean = std = 0.5, interleaved M-RoPE, deepstack (intermediate vision
features added to the first decoder layers' hidden states at the visual positions), videos written as
per-frame timestamps and vision blocks. Processing and the host position ids are ``processing``'s.

The forward is transformers' own ``Qwen3VLModel.forward`` with the host's ``position_ids`` given: the vision
tower, its deepstack features and their placement all run as upstream computes them from the pixel inputs
(a hand-written ``inputs_embeds`` path silently drops deepstack: note sec. 4 pitfall 5); only
``get_rope_index``'s per-row host loop is replaced.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch

from embedkit.backbones._common import IM_END, IM_START, model_output
from embedkit.backbones.base import (
    Backbone,
    BackboneOutput,
    ChunkProcessor,
    one_source,
    seeded,
    set_attention,
    torch_dtype,
)
from embedkit.backbones.checkpoints import load_pretrained, open_checkpoint
from embedkit.backbones.qwen2_vl.adapter import (
    IMAGE_PAD,
    PIXEL_KEYS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    peft_module_name,
    vision_token_ids,
)
from embedkit.backbones.qwen3_vl.processing import Qwen3VLChunkProcessor
from embedkit.config.registry import register
from embedkit.errors import UserError

FAMILY = "qwen3_vl"
EOS, PAD = "<|im_end|>", "<|endoftext|>"  # Qwen3-VL's eos_token_id 151645; <|endoftext|> 151643 pads
#: the transformers model types this family loads
MODEL_TYPES = ("qwen3_vl",)
#: Qwen3-VL's image normalisation (the checkpoints' preprocessor_config; the Pil class defaults are CLIP's)
MEAN_STD = [0.5, 0.5, 0.5]
#: Qwen3-VL-Embedding's default instruction, its system message (src/models/qwen3_vl_embedding.py L170)
DEFAULT_SYSTEM = "Represent the user's input."


@register("backbone", FAMILY)
class Qwen3VLBackbone(Backbone):
    """Qwen3-VL adapter. ``tiny=true`` builds a small random model (tests); ``path``: a Qwen3-VL checkpoint
    in the transformers layout (a ``Qwen3VLForConditionalGeneration`` one loads, its ``lm_head`` dropped),
    or a PEFT adapter folder over one.

    ``prompt``: ``none``, the item's content as it is; ``chat``, Qwen's chat template with ``system_prompt``
    as the system message and the generation prompt (Qwen3-VL-Embedding's input; ``processing``). Then
    ``append_token`` (None: the tokenizer's EOS) when ``append_eos``: Qwen3-VL-Embedding appends and pools
    ``<|endoftext|>`` (recipes/qwen3_vl_embedding.yaml). The projector (``model.visual.merger`` and the deepstack mergers) belongs to the tower
    and trains exactly when it does (``freeze_vision=false``).
    """

    lora_target = r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
    vision_prefixes = ("model.visual.",)

    def __init__(
        self,
        seed: int,
        path: Optional[str] = None,
        tiny: bool = False,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str = "sdpa",
        attention: Literal["causal", "bidirectional"] = "causal",
        freeze_vision: bool = True,
        gradient_checkpointing: bool = False,
        min_pixels: int = 4 * 32 * 32,
        max_pixels: int = 1800 * 32 * 32,
        max_length: int = 8192,
        append_eos: bool = True,
        append_token: Optional[str] = None,
        prompt: Literal["none", "chat"] = "none",
        system_prompt: str = DEFAULT_SYSTEM,
        candidate_system_prompt: Optional[str] = None,
        resize: Optional[list[int]] = None,
        video_min_pixels: Optional[int] = None,
        video_max_pixels: Optional[int] = None,
        video_total_pixels: Optional[int] = None,
        tiny_hidden_size: int = 64,
        tiny_layers: int = 2,
        tiny_vision_layers: int = 2,
    ):
        super().__init__()
        from transformers import Qwen2VLImageProcessorPil

        one_source(FAMILY, path, tiny)
        checkpoint = None if tiny else open_checkpoint(path, FAMILY)
        pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        if tiny:
            self.tokenizer = tiny_tokenizer()
            self.image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                                            image_mean=MEAN_STD, image_std=MEAN_STD, **pixels)
            with seeded(seed):
                self.model = _tiny_model(self.tokenizer, tiny_hidden_size, tiny_layers, tiny_vision_layers,
                                         attn_implementation)
        else:
            self.model, self.tokenizer, self.image_processor = load_pretrained(
                checkpoint, torch_dtype(dtype), attn_implementation, model_types=MODEL_TYPES,
                image_processor=(Qwen2VLImageProcessorPil, pixels))
        self.max_length, self.append_eos, self.resize = max_length, append_eos, resize
        self.system = system_prompt if prompt == "chat" else None
        # the candidate side's system message (queries: their task instruction; documents: the default)
        self.candidate_system = candidate_system_prompt if prompt == "chat" else None
        self.append_token = append_token
        _check_tokens(self.tokenizer, prompt, append_token if append_eos else None)
        # per frame; None: the image caps, no per-video budget
        self.video = (video_min_pixels or min_pixels, video_max_pixels or max_pixels, video_total_pixels)
        config = self.model.config
        self.hidden_size = config.text_config.hidden_size
        self.num_layers = config.text_config.num_hidden_layers
        self.merge_size = config.vision_config.spatial_merge_size
        #: (<|vision_start|>, <|vision_end|>) ids: the vision span a pooling head may read (``BackboneOutput.span``)
        self.vision_ids = (config.vision_start_token_id, config.vision_end_token_id)
        set_attention(self.model.language_model, attention, FAMILY)
        self.finish_init(tiny=tiny, dtype=dtype, freeze_vision=freeze_vision,
                         gradient_checkpointing=gradient_checkpointing)
        if checkpoint is not None:
            checkpoint.merge_adapter(self, peft_module_name)

    def make_processor(self) -> ChunkProcessor:
        return Qwen3VLChunkProcessor(self.tokenizer, self.image_processor, self.merge_size, self.max_length,
                                     append_eos=self.append_eos, resize=self.resize, video=self.video,
                                     system=self.system, append_token=self.append_token,
                                     candidate_system=self.candidate_system)

    @staticmethod
    def check_config(params: dict) -> None:
        resize = params.get("resize")
        if resize is not None and (len(resize) != 2 or min(resize) < 1):
            raise ValueError(f"resize: expected [width, height] in pixels, got {resize!r}")
        for key in ("video_min_pixels", "video_max_pixels", "video_total_pixels"):
            if params.get(key) is not None and params[key] < 1:
                raise ValueError(f"{key}: expected a positive number of pixels (or null), got {params[key]!r}")
        if params.get("candidate_system_prompt") is not None and params.get("prompt", "none") != "chat":
            raise ValueError("candidate_system_prompt: a system message needs prompt=chat")

    def forward(self, inputs: dict[str, Any], output_all_layers: bool = False) -> BackboneOutput:
        """transformers' forward on the chunk (its ``position_ids`` from the host when present)."""
        out = self.model(**inputs, output_hidden_states=output_all_layers, use_cache=False)
        return model_output(self, inputs, out, output_all_layers, PIXEL_KEYS, self._vision_dummy,
                            vision_ids=self.vision_ids)

    def _vision_dummy(self, device: torch.device) -> torch.Tensor:
        """The trainable tower's outputs on one image of merge x merge zero patches, for a chunk without
        pixels (``_common.keep_vision_in_graph``; why: qwen2_vl's ``_vision_dummy``): the merged features
        and every deepstack merger's, so the deepstack mergers get (zero) gradients too (the pitfall
        EasyR1 PR #530 fixed, research note sec. 4 item 6)."""
        m = self.merge_size
        visual = self.model.visual
        embed = visual.patch_embed
        width = embed.in_channels * embed.temporal_patch_size * embed.patch_size**2
        pixels = torch.zeros(m * m, width, device=device, dtype=visual.dtype)
        out = visual(pixels, grid_thw=torch.tensor([[1, m, m]], device=device), return_dict=True)
        return sum((f.sum() for f in out.deepstack_features), out.pooler_output.sum())

    def save_pretrained(self, directory: str) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


def _check_tokens(tokenizer, prompt: str, append_token: Optional[str]) -> None:
    """One-line UserError when the tokenizer lacks what the prompt needs: the chat markers as single
    tokens (``prompt=chat``), ``append_token`` as one token."""
    wanted = ([IM_START, IM_END] if prompt == "chat" else []) + ([append_token] if append_token else [])
    for token in wanted:
        if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1:
            key = "append_token" if token == append_token else "prompt"
            raise UserError(f"model.backbone.{key}: the tokenizer has no single token {token!r}")


def tiny_tokenizer():
    """The tiny form's word-level tokenizer with Qwen3-VL's special tokens (pad ``<|endoftext|>``, eos
    ``<|im_end|>``, the chat and vision markers)."""
    from embedkit.backbones.processors import tiny_tokenizer as build

    return build([IM_START, VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD], pad=PAD, eos=EOS)


def _tiny_model(tokenizer, hidden: int, layers: int, vision_layers: int, attn_implementation: str):
    """A random Qwen3VLModel (research note sec. 3.4's tiny config, scaled by ``hidden``): patch 16,
    deepstack at every vision layer, interleaved M-RoPE whose sections sum to head_dim / 2."""
    from transformers import Qwen3VLConfig, Qwen3VLModel

    heads, head_dim = 4, hidden // 4
    half = head_dim // 2
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                             "mrope_section": [half - 2 * (half // 4), half // 4, half // 4]}),
        vision_config=dict(depth=vision_layers, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=256, deepstack_visual_indexes=list(range(vision_layers))),
        **vision_token_ids(tokenizer),
    )
    config._attn_implementation = attn_implementation
    return Qwen3VLModel(config)
