"""Qwen2-VL / Qwen2.5-VL as an embedding backbone (VLM2Vec arXiv 2410.05160 uses Qwen2-VL 2B/7B).

Processing: an image becomes ``<|vision_start|>`` + N x ``<|image_pad|>`` + ``<|vision_end|>`` with
N = (grid_h * grid_w) / merge_size^2 from the PIL image processor (no torchvision), a video the same with
``<|video_pad|>`` and N = t * h * w / merge_size^2 (``video_pixels``); MMEB's ``<|image_k|>`` /
``<|video_1|>`` mark where they go, else they lead the text (``schema.segments``; docs/video.md). Resolution policy: at most
``max_pixels`` (reference default 1280*28*28, Qwen2-VL model card) and at least ``min_pixels``.
Sequences are right-padded and end with the EOS token, the state that last-token pooling reads
(``append_eos=false``: the last text token, as VLM2Vec pools). ``resize: [W, H]`` first resizes every
image to exactly W x H (VLM2Vec v1's ``--image_resolution high``: 1344 x 1344, aspect not kept).
``prompt``/``system_prompt``/``append_token``: the released embedders' prompt layouts (``PromptLayout``;
GME: ``chat`` + ``<|endoftext|>``, VLM2Vec-V2: ``bare``; docs/released-embedders.md).

The vision attention (``batched_vision_attention``, default on) is ``vision_attention``'s; the
position ids and vision bookkeeping of Qwen2-VL chunks are computed on the host (``host_positions``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import torch

from embedkit.backbones._common import (
    DEFAULT_SYSTEM,
    IM_END,
    IM_START,
    chat_text_frame,
    model_output,
    qwen_token_inputs,
)
from embedkit.backbones.base import (
    Backbone,
    BackboneOutput,
    ChunkProcessor,
    one_source,
    refusal_by_length,
    seeded,
    set_attention,
    torch_dtype,
)
from embedkit.backbones.checkpoints import load_pretrained, open_checkpoint
from embedkit.backbones.qwen2_vl.host_positions import HOST_KEYS, host_inputs, vision_rope
from embedkit.backbones.qwen2_vl.video_pixels import video_grid, videos_pixels
from embedkit.backbones.qwen2_vl.vision_attention import use_batched_vision_attention
from embedkit.config.registry import register
from embedkit.data.schema import Item, Segment, segments

FAMILY = "qwen2_vl"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"
EOS, PAD = "<|endoftext|>", "<|pad|>"
#: the chunk keys that carry pixels (a chunk with none runs a trainable tower on a dummy input)
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")
#: the transformers model types this family loads
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


# -- prompt layout (issue 29: the released embedders' conventions; docs/released-embedders.md) ----------------
@dataclass(frozen=True)
class PromptLayout:
    """How an item is framed: ``before`` + content + ``after`` (text), then the appended token.

    ``bare``: each image or video is its pad tokens alone, without ``<|vision_start|>``/``<|vision_end|>``,
    and a visual that leads the text is followed by a space (VLM2Vec-V2: ``"<|image_pad|> {instruction}
    {text}"``, TIGER-AI-Lab/VLM2Vec @ 6e1e1d4 ``src/model/processor.py``)."""

    before: str = ""
    after: str = ""
    bare: bool = False
    visual_only: bool = False  # the frame only around an item with a visual (jina-v4: text items are bare)
    visual_text: str = ""  # the text of an item with a visual and no text of its own (jina-v4's)


#: jina-embeddings-v4's image prompt (HF jinaai/jina-embeddings-v4 @ 509c533, its processor's image text):
#: ``<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n``
JINA_IMAGE_TEXT = "Describe the image."


def prompt_layout(prompt: str, system_prompt: str) -> PromptLayout:
    """``prompt`` (none | chat | bare | jina) -> its layout; ``chat``: Qwen's chat template with the generation
    prompt and ``system_prompt`` as the system message (``_common.chat_text_frame``, GME's); ``jina``: a
    visual item as jina-v4's image prompt (a user turn without the generation prompt, "Describe the image."
    where the item has no text), a text item bare (its "Query: "/"Passage: " prefix is the item's text)."""
    if prompt == "chat":
        return PromptLayout(*chat_text_frame(system_prompt))
    if prompt == "jina":
        return PromptLayout(f"{IM_START}user\n", f"{IM_END}\n", visual_only=True, visual_text=JINA_IMAGE_TEXT)
    return PromptLayout(bare=prompt == "bare")
# -- end of prompt layout ---------------------------------------------------------------------------------


class Qwen2VLChunkProcessor(ChunkProcessor):
    """Items -> Qwen2-VL inputs: every image of every item through the PIL image processor, every video
    through ``video_pixels``, each placed where ``schema.segments`` reads it.

    ``video``: the per-frame ``(min_pixels, max_pixels, total_pixels)`` of ``video_pixels`` (None: the
    image caps, no budget)."""

    def __init__(self, tokenizer, image_processor, merge_size: int, max_length: int, append_eos: bool = True,
                 resize: Optional[list[int]] = None, host_positions: bool = False,
                 video: Optional[tuple[int, int, Optional[int]]] = None,
                 layout: PromptLayout = PromptLayout(), end: Optional[str] = None,
                 candidate_layout: Optional[PromptLayout] = None):
        self.layout = layout  # prompt layout: the frame around the content; ``end``: the appended token
        self.candidate_layout = candidate_layout  # the candidate side's frame (None: ``layout``; ``for_side``)
        self.host_positions = host_positions  # add ``host_inputs`` to chunks with images or videos (Qwen2-VL)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge_size = merge_size
        self.max_length = self.max_tokens = max_length
        self.end = (end or tokenizer.eos_token) if append_eos else ""
        self.resize = tuple(resize) if resize else None  # (width, height)
        size = image_processor.size
        self.video = video or (size["shortest_edge"], size["longest_edge"], None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)

    def for_side(self, side: Optional[str]) -> "Qwen2VLChunkProcessor":
        """A copy framing the candidate side with ``candidate_layout`` (GME: "You are a helpful assistant." as
        every candidate's system message, the query's instruction for queries); ``self`` otherwise."""
        if side != "candidate" or self.candidate_layout is None:
            return self
        out = copy.copy(self)
        out.layout, out.candidate_layout = self.candidate_layout, None
        return out

    def _image(self, image):
        """The fixed pre-resize (``resize``, aspect not kept), before the processor's own policy."""
        return image.convert("RGB").resize(self.resize) if self.resize else image

    def _visuals(self, items: list[Item], segs: list[list[Segment]]) -> tuple[dict[str, torch.Tensor], list, list]:
        """The pixel inputs of a chunk and each image's and each video's token count, in token order (an
        item's ``<|image_2|>`` before its ``<|image_1|>`` puts image 2 first: transformers pairs the image
        grids and features with the image tokens in token order)."""
        out: dict[str, torch.Tensor] = {}
        images = [self._image(it.images[k]) for it, s in zip(items, segs) for kind, k in s if kind == "image"]
        videos = [it.video.images for it in items if it.video is not None]
        image_counts, video_counts = [], []
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"] = vision["pixel_values"]
            out["image_grid_thw"] = vision["image_grid_thw"]
            image_counts = (vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        if videos:
            pixels, grids = zip(*videos_pixels(videos, self.image_processor, *self.video))
            out["pixel_values_videos"] = torch.from_numpy(np.concatenate(pixels))
            out["video_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            video_counts = (out["video_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        return out, image_counts, video_counts

    def _text(self, segs: list[Segment], counts: dict) -> str:
        """An item's text with each visual's tokens in its place; ``counts``: iterators over the chunk's
        image and video token counts, in token order."""
        parts = []
        for kind, value in segs:
            if kind == "text":
                parts.append(value)
            else:
                pad = (IMAGE_PAD if kind == "image" else VIDEO_PAD) * next(counts[kind])
                parts.append(pad if self.layout.bare else VISION_START + pad + VISION_END)
        if parts:  # an empty text (no segments) renders as the frame alone
            parts[-1] = self._lead_space(segs) + parts[-1]
        before, after = self._frame(segs)
        return before + "".join(parts) + after + self.end

    def _frame(self, segs: list[Segment]) -> tuple[str, str]:
        """The layout's text before and after an item's content: none around a text item in a frame for
        visual items only (jina-v4), and the layout's ``visual_text`` after the visuals of an item without
        text (jina-v4's "Describe the image.")."""
        layout = self.layout
        visual = any(kind != "text" for kind, _ in segs)
        if layout.visual_only and not visual:
            return "", ""
        text_less = visual and all(kind != "text" for kind, _ in segs)
        return layout.before, (layout.visual_text if text_less else "") + layout.after

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        segs = [segments(it) for it in items]
        out, image_counts, video_counts = self._visuals(items, segs)
        counts = {"image": iter(image_counts), "video": iter(video_counts)}
        texts = [self._text(s, counts) for s in segs]
        out.update(qwen_token_inputs(self.tokenizer, texts, self.max_length, self.image_token_id, self.video_token_id))
        if (image_counts or video_counts) and self.host_positions:
            out.update(host_inputs(out, self.merge_size))
        return out

    def refusal(self, item: Item) -> str | None:
        """An image the image processor refuses (an aspect ratio of 200 or more), placeholders that do not
        match the item's visuals, an item over ``max_length``."""
        return refusal_by_length(self, item)

    def num_tokens(self, item: Item) -> int:
        """The processed length by arithmetic: text tokens, each image's and the video's tokens from their
        sizes (and frame count), 2 per visual for ``<|vision_start|>``/``<|vision_end|>`` (none in the bare
        layout), the prompt frame's tokens (counted apart from the content), EOS or ``append_token``."""
        segs = segments(item)
        n = bool(self.end) + self._frame_tokens(segs)
        for i, (kind, value) in enumerate(segs):
            if kind == "text":
                space = self._lead_space(segs) if i == len(segs) - 1 else ""
                n += len(self.tokenizer(space + value, add_special_tokens=False)["input_ids"])
            elif kind == "image":
                width, height = self.resize or item.images[value].size
                n += self.image_processor.get_number_of_image_patches(height, width) // self.merge_size**2
            else:
                width, height = item.video.images[0].size
                t, h, w = video_grid(width, height, len(item.video.images), self.image_processor, *self.video)
                n += t * h * w // self.merge_size**2
            n += 0 if kind == "text" or self.layout.bare else 2
        return n

    def _lead_space(self, segs: list[Segment]) -> str:
        """" " where the bare layout's visual leads the final text ("<|image_pad|> {text}", VLM2Vec-V2)."""
        bare = self.layout.bare and len(segs) > 1
        return " " if bare and segs[-1][0] == "text" and segs[-2][0] != "text" else ""

    def _frame_tokens(self, segs: list[Segment]) -> int:
        """The tokens of the prompt layout's frame around an item (``_frame``: the template's text)."""
        return sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in self._frame(segs) if t)


@register("backbone", FAMILY)
class Qwen2VLBackbone(Backbone):
    """Qwen2-VL / Qwen2.5-VL adapter. ``tiny=true`` builds a small random model (tests, demo).

    ``path``: a hub id or local folder in the transformers layout, or a PEFT LoRA/DoRA adapter folder
    over one (VLM2Vec's released Qwen2-VL checkpoints: ``adapter_config.json`` names the base model; the
    adapter is merged on load, old and new transformers key names alike: ``peft_module_name``).

    No ``train_projector`` key: the projector (``model.visual.merger``) is part of the vision tower and
    trains exactly when it does (``freeze_vision=false``).
    """

    #: the registered name, the transformers model types ``path`` may hold, the tiny model's builder
    family, model_types = FAMILY, MODEL_TYPES
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
        min_pixels: int = 56 * 56,
        max_pixels: int = 1280 * 28 * 28,
        max_length: int = 4096,
        append_eos: bool = True,
        resize: Optional[list[int]] = None,
        video_min_pixels: Optional[int] = None,
        video_max_pixels: Optional[int] = None,
        video_total_pixels: Optional[int] = None,
        tiny_hidden_size: int = 64,
        tiny_layers: int = 2,
        tiny_vision_layers: int = 2,
        batched_vision_attention: bool = True,
        prompt: Literal["none", "chat", "bare", "jina"] = "none",
        system_prompt: str = DEFAULT_SYSTEM,
        candidate_system_prompt: Optional[str] = None,
        append_token: Optional[str] = None,
    ):
        super().__init__()
        from transformers import Qwen2VLImageProcessorPil

        one_source(self.family, path, tiny)
        checkpoint = None if tiny else open_checkpoint(path, self.family)
        if tiny:
            from embedkit.backbones.processors import tiny_tokenizer

            chat = [IM_START, IM_END] if prompt in ("chat", "jina") else []  # (the default tiny vocabulary stays)
            self.tokenizer = tiny_tokenizer([VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD, *chat], pad=PAD, eos=EOS)
            self.image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
            with seeded(seed):
                self.model = self._tiny_model(self.tokenizer, tiny_hidden_size, tiny_layers, tiny_vision_layers,
                                         attn_implementation)
        else:
            self.model, self.tokenizer, self.image_processor = load_pretrained(
                checkpoint, torch_dtype(dtype), attn_implementation, model_types=self.model_types,
                image_processor=(Qwen2VLImageProcessorPil, {"min_pixels": min_pixels, "max_pixels": max_pixels}),
            )
        self.max_length = max_length
        self.append_eos, self.resize = append_eos, resize
        # prompt layout (issue 29): the frame of each item and the appended token (None: the tokenizer's EOS)
        self.layout, self.append_token = prompt_layout(prompt, system_prompt), append_token
        # the system messages of the chat layout (None otherwise; the export's chat template reads them)
        self.system = system_prompt if prompt == "chat" else None
        self.candidate_system = candidate_system_prompt if prompt == "chat" else None
        # the candidate side's system message (GME: queries get the instruction, candidates the default)
        self.candidate_layout = None if candidate_system_prompt is None else prompt_layout(prompt, candidate_system_prompt)
        _check_prompt_tokens(self.tokenizer, prompt, append_token if append_eos else None)
        # per frame; None: the image caps (VLM2Vec-V2 resizes frames like images), no per-video budget
        self.video = (video_min_pixels or min_pixels, video_max_pixels or max_pixels, video_total_pixels)
        config = self.model.config
        self.hidden_size = config.text_config.hidden_size
        self.num_layers = config.text_config.num_hidden_layers
        self.merge_size = config.vision_config.spatial_merge_size
        #: (<|vision_start|>, <|vision_end|>) ids: the vision span a pooling head may read (``BackboneOutput.span``)
        self.vision_ids = (config.vision_start_token_id, config.vision_end_token_id)
        set_attention(self.model.language_model, attention, self.family)
        self._vision_cache: dict | None = None  # the batched vision attention's grouping, per forward
        if batched_vision_attention and use_batched_vision_attention(self.model):
            self._vision_cache = next(m._embedkit_groups for m in self.model.modules() if hasattr(m, "_embedkit_groups"))
        # the position ids and vision bookkeeping on the host: Qwen2-VL's forward only (Qwen2.5-VL differs)
        self.host_positions = config.model_type == "qwen2_vl"
        self.finish_init(tiny=tiny, dtype=dtype, freeze_vision=freeze_vision,
                         gradient_checkpointing=gradient_checkpointing)
        if checkpoint is not None:
            checkpoint.merge_adapter(self, peft_module_name)

    @staticmethod
    def _tiny_model(tokenizer, hidden: int, layers: int, vision_layers: int, attn_implementation: str):
        """The family's small random model (``tiny=true``)."""
        return _tiny_model(tokenizer, hidden, layers, vision_layers, attn_implementation)

    def make_processor(self) -> ChunkProcessor:
        return Qwen2VLChunkProcessor(self.tokenizer, self.image_processor, self.merge_size, self.max_length,
                                     append_eos=self.append_eos, resize=self.resize,
                                     host_positions=self.host_positions, video=self.video,
                                     layout=self.layout, end=self.append_token,
                                     candidate_layout=self.candidate_layout)

    @staticmethod
    def check_config(params: dict) -> None:
        resize = params.get("resize")
        if resize is not None and (len(resize) != 2 or min(resize) < 1):
            raise ValueError(f"resize: expected [width, height] in pixels, got {resize!r}")
        for key in ("video_min_pixels", "video_max_pixels", "video_total_pixels"):
            if params.get(key) is not None and params[key] < 1:
                raise ValueError(f"{key}: expected a positive number of pixels (or null), got {params[key]!r}")
        if params.get("append_token") and params.get("append_eos") is False:
            raise ValueError("append_token: set, but append_eos is false (nothing is appended)")
        if params.get("candidate_system_prompt") is not None and params.get("prompt", "none") != "chat":
            raise ValueError("candidate_system_prompt: a system message needs prompt=chat")

    def forward(self, inputs: dict[str, Any], output_all_layers: bool = False) -> BackboneOutput:
        if HOST_KEYS[0] in inputs:
            out = self._forward_prepared(inputs, output_all_layers)
        else:
            out = self.model(**inputs, output_hidden_states=output_all_layers, use_cache=False)
        return model_output(self, inputs, out, output_all_layers, PIXEL_KEYS, self._vision_dummy,
                            vision_ids=self.vision_ids)

    def _vision_dummy(self, device: torch.device) -> torch.Tensor:
        """The trainable vision tower's output on a minimal input (one image of merge x merge zero patches),
        for a chunk without pixels. Under DDP and FSDP2 every rank must run the same modules: FSDP2
        all-gathers the tower's parameters in its forward (a collective), and DDP's reducer waits for a
        gradient of every parameter; a rank whose chunk has no image or video while another rank's has
        would skip the tower and hang the step (or fail DDP's unused-parameter check). ``forward`` adds
        ``0 * sum`` of this to its outputs (``_common.keep_vision_in_graph``, as every family): the same
        values, and zero (not None) gradients on the tower.
        Qwen2-VL gets the host's inputs for it (no host sync); Qwen2.5-VL runs transformers' own path."""
        m = self.merge_size
        embed = self.model.visual.patch_embed
        width = embed.in_channels * embed.temporal_patch_size * embed.patch_size**2
        pixels = torch.zeros(m * m, width, device=device)
        grid = torch.tensor([[1, m, m]], device=device)
        if not self.host_positions:
            return self.model.visual(pixels.type(self.model.visual.dtype), grid_thw=grid).pooler_output
        cu = torch.tensor([0, m * m], dtype=torch.int32, device=device)
        positions = torch.from_numpy(vision_rope(1, m, m, m)).to(device)
        return self._run_visual(pixels, grid, cu, positions, ([(m * m, 1, 0)], None))

    def _forward_prepared(self, inputs: dict[str, Any], output_all_layers: bool):
        """Qwen2-VL's forward for a chunk carrying ``host_inputs``: the vision tower with its positions and
        ``cu_seqlens`` given, its features written into the token embeddings at the image tokens' known
        positions (``index_copy``: what ``masked_scatter`` does, without counting the mask), the language
        model with the M-RoPE position ids given. The tower runs once over the image patches followed by
        the video patches (one patch width: C * t * p * p); ``visual_token_index`` lists the image tokens'
        positions, then the video tokens', in that order."""
        model = self.model
        pixels = [inputs[k] for k in ("pixel_values", "pixel_values_videos") if k in inputs]
        grids = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if k in inputs]
        visual = self._run_visual(pixels[0] if len(pixels) == 1 else torch.cat(pixels),
                                  grids[0] if len(grids) == 1 else torch.cat(grids), inputs["vision_cu_seqlens"],
                                  inputs["vision_position_ids"], (inputs["vision_groups"], inputs.get("vision_order")))
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        flat = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, inputs["visual_token_index"], visual.to(embeds.dtype))
        return model(inputs_embeds=flat.view_as(embeds), attention_mask=inputs["attention_mask"],
                     position_ids=inputs["rope_position_ids"], output_hidden_states=output_all_layers, use_cache=False)

    def _run_visual(self, pixels: torch.Tensor, grid: torch.Tensor, cu: torch.Tensor, positions: torch.Tensor,
                    groups) -> torch.Tensor:
        """The vision tower's merged features of ``pixels`` with the host's ``cu_seqlens``, rotary positions
        and batched-attention grouping ``(groups, order)`` given: no ``.tolist()`` in the forward."""
        visual = self.model.visual
        if self._vision_cache is not None:
            self._vision_cache.clear()
            self._vision_cache.update(key=cu, groups=groups)
        return visual(pixels.type(visual.dtype), grid_thw=grid, cu_seqlens=cu, position_ids=positions).pooler_output

    def save_pretrained(self, directory: str) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


def _check_prompt_tokens(tokenizer, prompt: str, append_token: Optional[str]) -> None:
    """One-line ValueError when the tokenizer lacks a token the prompt layout needs: the chat markers
    (``prompt=chat``) or ``append_token`` as one token."""
    needed = ([IM_START, IM_END] if prompt in ("chat", "jina") else []) + ([append_token] if append_token else [])
    for token in needed:
        if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1 or \
                tokenizer.convert_tokens_to_ids(token) == tokenizer.unk_token_id:
            raise ValueError(f"model.backbone: the tokenizer has no token {token!r} (prompt={prompt}, append_token)")


def peft_module_name(name: str) -> Optional[str]:
    """A module name of the model a PEFT adapter was saved against, Qwen2-VL's ``...ForConditionalGeneration``
    (transformers < 4.52: ``model.layers.*``, ``visual.*``; later: ``model.language_model.*``,
    ``model.visual.*``) -> this backbone's (None: no such module)."""
    if name.startswith(("model.language_model.", "model.visual.")):
        return name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    if name.startswith("visual."):
        return "model." + name
    return None


def _tiny_model(tokenizer, hidden: int, layers: int, vision_layers: int, attn_implementation: str):
    from transformers import Qwen2VLConfig, Qwen2VLModel

    config = Qwen2VLConfig(
        text_config=tiny_text_config(tokenizer, hidden, layers, rope_theta=10000.0),
        vision_config=dict(depth=vision_layers, embed_dim=hidden, hidden_size=hidden, num_heads=4,
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **vision_token_ids(tokenizer),
    )
    config._attn_implementation = attn_implementation
    return Qwen2VLModel(config)


def tiny_text_config(tokenizer, hidden: int, layers: int, rope_theta: float) -> dict:
    """The language model of the tiny Qwen2-VL / Qwen2.5-VL: 4 heads (2 KV), M-RoPE sections (temporal,
    height, width) summing to head_dim / 2, the tokenizer's pad and EOS ids."""
    return dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta,
                         "mrope_section": _mrope_sections(hidden // 4 // 2)},
    )


def vision_token_ids(tokenizer) -> dict:
    """The Qwen-VL configs' image, video, vision-start and vision-end token ids, from ``tokenizer``."""
    return {"image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_PAD),
            "video_token_id": tokenizer.convert_tokens_to_ids(VIDEO_PAD),
            "vision_start_token_id": tokenizer.convert_tokens_to_ids(VISION_START),
            "vision_end_token_id": tokenizer.convert_tokens_to_ids(VISION_END)}


def _mrope_sections(half: int) -> list[int]:
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]
