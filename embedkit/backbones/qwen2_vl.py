"""Qwen2-VL / Qwen2.5-VL as an embedding backbone (VLM2Vec arXiv 2410.05160 uses Qwen2-VL 2B/7B).

Processing: an image becomes ``<|vision_start|>`` + N x ``<|image_pad|>`` + ``<|vision_end|>`` with
N = (grid_h * grid_w) / merge_size^2 from the PIL image processor (no torchvision); MMEB's
``<|image_1|>`` marks where it goes (else it leads the text). Resolution policy: at most
``max_pixels`` (reference default 1280*28*28, Qwen2-VL model card) and at least ``min_pixels``.
Sequences are right-padded and end with the EOS token, the state that last-token pooling reads
(``append_eos=false``: the last text token, as VLM2Vec pools). ``resize: [W, H]`` first resizes every
image to exactly W x H (VLM2Vec v1's ``--image_resolution high``: 1344 x 1344, aspect not kept).

Vision attention (``batched_vision_attention``, default on): transformers' SDPA path of the vision
tower splits the packed patches by image and runs one attention call per image per layer, with a
``.tolist()`` host sync in every layer. Here images of equal patch count are attended together as
one dense batch: one SDPA call per distinct image size per layer, the grouping computed once per
forward from ``cu_seqlens``. Same outputs as the per-image loop; flash attention (varlen) and eager
keep transformers' own path.

Host-side positions (Qwen2-VL; not Qwen2.5-VL): what Qwen2-VL's forward computes from the integer
inputs -- the language model's M-RoPE position ids (``get_rope_index``: a Python loop over the
chunk's rows with several host syncs per row and per image), the vision tower's rotary positions
and ``cu_seqlens``, where the image features go, the image grouping of the batched attention -- the
processor computes on the CPU, in the DataLoader workers, with transformers' own functions
(``host_inputs``). ``forward`` then runs the vision tower, writes its features into the token
embeddings at the known positions and calls the model with the position ids given: no host sync
in the vision path or the position ids, the same outputs.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Any, Literal, Optional

import numpy as np
import torch

from embedkit.backbones import _layouts
from embedkit.backbones.base import (
    IMAGE_PLACEHOLDER,
    Backbone,
    BackboneOutput,
    ChunkProcessor,
    one_source,
    seeded,
    set_attention,
    torch_dtype,
)
from embedkit.backbones.loading import merge, open_adapter
from embedkit.config.registry import register
from embedkit.data.schema import Item

FAMILY = "qwen2_vl"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
EOS, PAD = "<|endoftext|>", "<|pad|>"


class Qwen2VLChunkProcessor(ChunkProcessor):
    def __init__(self, tokenizer, image_processor, merge_size: int, max_length: int, append_eos: bool = True,
                 resize: Optional[list[int]] = None, host_positions: bool = False):
        self.host_positions = host_positions  # add ``host_inputs`` to chunks with images (Qwen2-VL)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.merge_size = merge_size
        self.max_length = max_length
        self.end = tokenizer.eos_token if append_eos else ""
        self.resize = tuple(resize) if resize else None  # (width, height)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def _image(self, image):
        """The fixed pre-resize (``resize``, aspect not kept), before the processor's own policy."""
        return image.convert("RGB").resize(self.resize) if self.resize else image

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        images = [self._image(it.image) for it in items if it.image is not None]
        out: dict[str, torch.Tensor] = {}
        counts = []
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"] = vision["pixel_values"]
            out["image_grid_thw"] = vision["image_grid_thw"]
            counts = (vision["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        texts, k = [], 0
        for it in items:
            text = it.text or ""
            if it.image is not None:
                image = VISION_START + IMAGE_PAD * counts[k] + VISION_END
                k += 1
                text = text.replace(IMAGE_PLACEHOLDER, image, 1) if IMAGE_PLACEHOLDER in text else image + text
            texts.append(text + self.end)
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        if enc["input_ids"].shape[1] > self.max_length:
            raise ValueError(
                f"a sequence of {enc['input_ids'].shape[1]} tokens exceeds max_length={self.max_length}; "
                "lower model.backbone.max_pixels or raise model.backbone.max_length"
            )
        out["input_ids"] = enc["input_ids"]
        out["attention_mask"] = enc["attention_mask"]
        out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).int()
        if images and self.host_positions:
            out.update(host_inputs(out, self.merge_size, self.image_token_id))
        return out

    def num_tokens(self, item: Item) -> int:
        """The processed length by arithmetic: text tokens, image tokens from the image size, EOS."""
        parts = (item.text or "").split(IMAGE_PLACEHOLDER, 1)
        n = sum(len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in parts if p) + bool(self.end)
        if item.image is not None:
            width, height = self.resize or item.image.size
            n += self.image_processor.get_number_of_image_patches(height, width) // self.merge_size**2 + 2
        return n


@register("backbone", FAMILY)
class Qwen2VLBackbone(Backbone):
    """Qwen2-VL / Qwen2.5-VL adapter. ``tiny=true`` builds a small random model (tests, demo).

    ``path``: a hub id or local folder in the transformers layout, or a PEFT LoRA/DoRA adapter folder
    over one (VLM2Vec's released Qwen2-VL checkpoints: ``adapter_config.json`` names the base model; the
    adapter is merged on load, old and new transformers key names alike; ``backbones/_layouts.py``).

    No ``train_projector`` key: the projector (``model.visual.merger``) is part of the vision tower and
    trains exactly when it does (``freeze_vision=false``).
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
        min_pixels: int = 56 * 56,
        max_pixels: int = 1280 * 28 * 28,
        max_length: int = 4096,
        append_eos: bool = True,
        resize: Optional[list[int]] = None,
        tiny_hidden_size: int = 64,
        tiny_layers: int = 2,
        tiny_vision_layers: int = 2,
        batched_vision_attention: bool = True,
    ):
        super().__init__()
        from transformers import Qwen2VLImageProcessorPil

        one_source(FAMILY, path, tiny)
        path, adapter = open_adapter(path, FAMILY)
        if tiny:
            from embedkit.backbones.processors import tiny_tokenizer

            self.tokenizer = tiny_tokenizer([VISION_START, IMAGE_PAD, VISION_END], pad=PAD, eos=EOS)
            self.image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
            with seeded(seed):
                self.model = _tiny_model(self.tokenizer, tiny_hidden_size, tiny_layers, tiny_vision_layers,
                                         attn_implementation)
        else:
            from embedkit.backbones.loading import load_pretrained

            self.model, self.tokenizer, self.image_processor = load_pretrained(
                path, FAMILY, torch_dtype(dtype), attn_implementation,
                image_processor_cls=Qwen2VLImageProcessorPil,
                image_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
            )
            self.tokenizer.padding_side = "right"
        self.max_length = max_length
        self.append_eos, self.resize = append_eos, resize
        config = self.model.config
        self.hidden_size = config.text_config.hidden_size
        self.num_layers = config.text_config.num_hidden_layers
        self.merge_size = config.vision_config.spatial_merge_size
        set_attention(self.model.language_model, attention, FAMILY)
        self._vision_cache: dict | None = None  # the batched vision attention's grouping, per forward
        if batched_vision_attention and use_batched_vision_attention(self.model):
            self._vision_cache = next(m._embedkit_groups for m in self.model.modules() if hasattr(m, "_embedkit_groups"))
        # the position ids and vision bookkeeping on the host: Qwen2-VL's forward only (Qwen2.5-VL differs)
        self.host_positions = config.model_type == "qwen2_vl"
        self.finish_init(tiny=tiny, dtype=dtype, freeze_vision=freeze_vision,
                         gradient_checkpointing=gradient_checkpointing)
        merge(self, adapter, _layouts.qwen2_vl_module, FAMILY)

    def make_processor(self) -> ChunkProcessor:
        return Qwen2VLChunkProcessor(self.tokenizer, self.image_processor, self.merge_size, self.max_length,
                                     append_eos=self.append_eos, resize=self.resize,
                                     host_positions=self.host_positions)

    @staticmethod
    def check_config(params: dict) -> None:
        resize = params.get("resize")
        if resize is not None and (len(resize) != 2 or min(resize) < 1):
            raise ValueError(f"resize: expected [width, height] in pixels, got {resize!r}")

    def forward(self, inputs: dict[str, Any], output_all_layers: bool = False) -> BackboneOutput:
        if HOST_KEYS[0] in inputs:
            out = self._forward_prepared(inputs, output_all_layers)
        else:
            out = self.model(**inputs, output_hidden_states=output_all_layers, use_cache=False)
        return BackboneOutput(out.last_hidden_state, inputs["attention_mask"],
                              out.hidden_states if output_all_layers else None)

    def _forward_prepared(self, inputs: dict[str, Any], output_all_layers: bool):
        """Qwen2-VL's forward for a chunk carrying ``host_inputs``: the vision tower with its positions and
        ``cu_seqlens`` given, its features written into the token embeddings at the image tokens' known
        positions (``index_copy``: what ``masked_scatter`` does, without counting the mask), the language
        model with the M-RoPE position ids given."""
        model = self.model
        cu = inputs["vision_cu_seqlens"]
        if self._vision_cache is not None:  # the grouping, from the host: no .tolist() in the forward
            self._vision_cache.clear()
            self._vision_cache.update(key=cu, groups=(inputs["vision_groups"], inputs.get("vision_order")))
        image = model.visual(inputs["pixel_values"].type(model.visual.dtype), grid_thw=inputs["image_grid_thw"],
                             cu_seqlens=cu, position_ids=inputs["vision_position_ids"]).pooler_output
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        flat = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, inputs["image_token_index"], image.to(embeds.dtype))
        return model(inputs_embeds=flat.view_as(embeds), attention_mask=inputs["attention_mask"],
                     position_ids=inputs["rope_position_ids"], output_hidden_states=output_all_layers, use_cache=False)

    def save_pretrained(self, directory: str) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


# -- the integer work of a forward, on the host -------------------------------------------------
#: the chunk keys ``host_inputs`` adds (``forward`` takes the prepared path when the first is present)
HOST_KEYS = ("rope_position_ids", "vision_cu_seqlens", "vision_position_ids", "image_token_index", "vision_groups",
             "vision_order")


@functools.lru_cache(maxsize=256)
def _image_rope(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """M-RoPE ids of one image's tokens relative to its first position, [3, t * h/m * w/m]: temporal,
    height and width index of each merged patch (row-major over t, h, w)."""
    gh, gw = h // merge, w // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()])


@functools.lru_cache(maxsize=256)
def _vision_rope(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """The vision tower's rotary (row, column) of each patch of one image, [t * h * w, 2], in the
    tower's order: merge x merge blocks, row-major inside and across blocks, repeated per frame."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).ravel()
    cols = cols.reshape(block).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([rows, cols], axis=1), (t, 1))


def rope_positions(input_ids: torch.Tensor, token_types: torch.Tensor, attention_mask: torch.Tensor,
                   grids: list[list[int]], merge: int) -> torch.Tensor:
    """M-RoPE position ids [3, B, S] of a chunk (Qwen2-VL, arXiv 2409.12191 sec. 2.1), as the model's
    ``get_rope_index`` makes them: over each row's real tokens, a run of text tokens counts on from the
    current position on all three axes; an image's tokens (the next grid ``(t, h, w)`` of ``grids``)
    take ``current + (t, h/m, w/m)`` indices, and the text after it starts at ``current + max(h, w)/m``.
    Padding gets 0. Raises if a run of image tokens does not match its image's token count."""
    ids = input_ids.numpy()
    kinds_all, mask = token_types.numpy(), attention_mask.numpy().astype(bool)
    out = np.zeros((3, *ids.shape), dtype=np.int64)
    images = iter(grids)
    for b in range(ids.shape[0]):
        where = np.flatnonzero(mask[b])
        kinds = kinds_all[b, where]
        starts = np.flatnonzero(np.diff(kinds, prepend=kinds[:1] - 1)) if len(kinds) else []
        ends = list(starts[1:]) + [len(kinds)]
        row, current = [], 0
        for a, e in zip(starts, ends):
            if kinds[a] == 0:
                row.append(np.broadcast_to(np.arange(e - a) + current, (3, e - a)))
                current += e - a
            else:
                t, h, w = next(images)
                block = _image_rope(t, h, w, merge)
                if block.shape[1] != e - a:
                    raise ValueError(f"{FAMILY}: {e - a} image tokens in a row, but its image has {block.shape[1]}")
                row.append(block + current)
                current += max(h, w) // merge
        if row:
            out[:, b, where] = np.concatenate(row, axis=1)
    return torch.from_numpy(out)


def host_inputs(inputs: dict[str, torch.Tensor], merge_size: int, image_token_id: int) -> dict[str, Any]:
    """From a processed chunk with images (CPU tensors), what Qwen2-VL's forward would compute on the
    device with host syncs: ``rope_position_ids`` [3, B, S] (``rope_positions``), ``vision_cu_seqlens``
    (int32 patch boundaries of the images) and ``vision_position_ids`` [patches, 2] (the tower's rotary
    positions), ``image_token_index`` (flat positions of the image tokens, in order),
    ``vision_groups`` / ``vision_order`` (``image_groups``, for the batched vision attention).
    Equal to transformers' own (``tests/test_host_sync.py``); numpy, cached per image shape, since it
    runs in the DataLoader workers for every chunk."""
    grids = inputs["image_grid_thw"].tolist()
    ids = inputs["input_ids"]
    frames = [h * w for t, h, w in grids for _ in range(t)]  # one attention segment per frame
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(frames)]).astype(np.int32))
    groups, order = image_groups(cu)
    vision = np.concatenate([_vision_rope(t, h, w, merge_size) for t, h, w in grids])
    out: dict[str, Any] = {
        "rope_position_ids": rope_positions(ids, inputs["mm_token_type_ids"], inputs["attention_mask"], grids,
                                            merge_size),
        "vision_cu_seqlens": cu, "vision_position_ids": torch.from_numpy(vision),
        "image_token_index": (ids.reshape(-1) == image_token_id).nonzero().squeeze(1),
        "vision_groups": [list(g) for g in groups],
    }
    if order is not None:
        out["vision_order"] = order
    return out


# -- vision attention: images of one size in one SDPA call --------------------------------------
_VISION_ATTENTION = ("VisionAttention", "Qwen2_5_VLVisionAttention")


def use_batched_vision_attention(model) -> int:
    """Give every Qwen2-VL / Qwen2.5-VL vision attention module of ``model`` the batched forward;
    returns how many. The modules share one per-forward cache of the image grouping."""
    cache: dict = {}
    count = 0
    for module in model.modules():
        if type(module).__name__ in _VISION_ATTENTION and type(module).__module__.startswith("transformers.models.qwen2"):
            module._embedkit_groups = cache
            module.forward = types.MethodType(batched_vision_attention, module)
            count += 1
    return count


def image_groups(cu_seqlens: torch.Tensor) -> tuple[list[tuple[int, int, int]], torch.Tensor | None]:
    """Images (the segments of ``cu_seqlens``) grouped by patch count: ``[(length, count, first
    token)]`` over the packed sequence reordered by ``order`` (token indices; None: already grouped,
    i.e. images of one size are adjacent and the groups follow each other)."""
    bounds = cu_seqlens.tolist()  # the one host sync of a forward
    by_len: dict[int, list[int]] = {}
    for i in range(len(bounds) - 1):
        by_len.setdefault(bounds[i + 1] - bounds[i], []).append(i)
    groups, order, start = [], [], 0
    for length, images in by_len.items():
        groups.append((length, len(images), start))
        start += length * len(images)
        order += [t for i in images for t in range(bounds[i], bounds[i + 1])]
    if order == list(range(len(order))):
        return groups, None
    return groups, torch.tensor(order, device=cu_seqlens.device)


def batched_vision_attention(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                             position_embeddings=None, max_seqlen=None, **kwargs) -> torch.Tensor:
    """A Qwen2-VL vision attention forward with one SDPA call per image size (bound to the module)."""
    if self.config._attn_implementation != "sdpa":
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                  max_seqlen=max_seqlen, **kwargs)
    rotate = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    cache = self._embedkit_groups
    if cache.get("key") is not cu_seqlens:  # once per forward (per cu_seqlens: Qwen2.5-VL has two)
        cache.clear()
        cache["key"], cache["groups"] = cu_seqlens, image_groups(cu_seqlens)
    groups, order = cache["groups"]
    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotate(q, k, cos, sin)  # [n, heads, d]
    if order is not None:
        q, k, v = q[order], k[order], v[order]
    dropout = self.attention_dropout if self.training else 0.0
    outs = []
    for length, count, start in groups:
        # [count, heads, length, d]: the images of this size as a dense batch
        qg, kg, vg = (t[start:start + length * count].reshape(count, length, self.num_heads, -1).transpose(1, 2)
                      for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, scale=self.scaling)
        outs.append(o.transpose(1, 2).reshape(count * length, -1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if order is not None:
        out = torch.empty_like(out).index_copy(0, order, out)
    return self.proj(out)


def _tiny_model(tokenizer, hidden: int, layers: int, vision_layers: int, attn_implementation: str):
    from transformers import Qwen2VLConfig, Qwen2VLModel

    heads = 4
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
            max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            # M-RoPE sections (temporal, height, width) must sum to head_dim / 2
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": _mrope_sections(hidden // heads // 2)},
        ),
        vision_config=dict(depth=vision_layers, embed_dim=hidden, hidden_size=hidden, num_heads=heads,
                           mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PAD),
        vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(VISION_END),
    )
    config._attn_implementation = attn_implementation
    return Qwen2VLModel(config)


def _mrope_sections(half: int) -> list[int]:
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]
