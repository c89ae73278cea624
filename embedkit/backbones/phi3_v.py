"""Phi-3.5-Vision backbone, built in-project: transformers has no Phi-3.5-V, and remote code is not run.

Architecture (Phi-3 technical report, arXiv 2404.14219, sec. "Phi-3-Vision"; the checkpoint
``microsoft/Phi-3.5-vision-instruct``):

- a ``Phi3Model`` language model (fused ``qkv_proj`` and ``gate_up_proj``);
- a CLIP ViT-L/14-336 vision tower (``CLIPVisionModel``); features are the penultimate layer's
  hidden states without the CLS token (24 x 24 patches per 336-px crop);
- the HD transform: the image (transposed to landscape if portrait) is scaled so that a whole number
  of 336-px crops fits across with at most ``num_crops`` crops in all (reference: 4 for Phi-3.5-V), its
  height white-padded (centred) to a multiple of 336; the crops plus a bicubic global 336-px view are
  encoded separately;
- every 2 x 2 block of patch features is concatenated (4 x 1024 channels, 12 x 12 tokens per crop); the
  crops are stitched into one ``(h*12) x (w*12)`` feature map; a learned ``sub_GN`` vector ends every row,
  of the stitched map and of the global view; the order is sub-images, then ``glb_GN``, then the global
  view ("sub_glb"); a 2-layer MLP (Linear, GELU, Linear) projects to the LM width.
  Image tokens per image: ``(h*w + 1) * 144 + 1 + (h + 1) * 12`` for an ``h x w`` crop grid.

An item may hold several images, each with its own crops and tokens, placed by ``schema.segments``; a
video is read as its frames, each frame one image (``phi_pieces``; docs/video.md, "Backbones").

Checkpoint key layout (official name -> this module), loaded with strict key checks:

    model.embed_tokens.*, model.layers.*, model.norm.*        -> language_model.*
    model.vision_embed_tokens.img_processor.vision_model.*    -> vision_tower.*  (transformers 5's
                                                              CLIPVisionModel has no vision_model level)
    model.vision_embed_tokens.img_projection.{0,2}.*          -> projector.{0,2}.*
    model.vision_embed_tokens.glb_GN / sub_GN                 -> glb_GN / sub_GN
    model.vision_embed_tokens.wte.weight                      an alias of model.embed_tokens.weight (used
                                                              only when the latter is absent)
    lm_head.weight                                            dropped: an encoder has no LM head
    *.position_ids                                            dropped (old non-persistent buffers)

``config.json`` is the official one (``model_type: phi3_v``, Phi-3 text fields, ``embd_layer``,
``img_processor``); the vision tower is CLIP ViT-L/14-336 unless ``img_processor.embedkit_vision_config``
holds a CLIPVisionConfig (written by the tiny form, so that a tiny checkpoint round-trips).
In the token ids the processor marks image positions with ``-1``, as the reference processor does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import nn

from embedkit.backbones import _common
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
from embedkit.backbones.checkpoints import open_checkpoint
from embedkit.backbones.checkpoints.files import check_model_type, empty_weights, load_mapped
from embedkit.config.registry import register
from embedkit.data.schema import Item
from embedkit.errors import UserError

FAMILY = "phi3_v"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: CLIP ViT-L/14-336, the vision tower of the official checkpoint (its config.json does not carry it)
CLIP_L_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
EMBD_LAYER = {
    "embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
    "use_hd_transform": True, "with_learnable_separator": True,
}
_VISION_EMBED = "model.vision_embed_tokens."
#: the official checkpoint's second name for the token embeddings (read only when model.embed_tokens is absent)
WTE_ALIAS = _VISION_EMBED + "wte.weight"
_TEXT_SKIP = {"model_type", "architectures", "auto_map", "embd_layer", "img_processor",
              "transformers_version", "torch_dtype", "dtype"}


def hd_layout(width: int, height: int, num_crops: int, crop: int) -> tuple[bool, int, int, int]:
    """The HD transform's arithmetic: (transposed, resized width, resized height, padded height), in the
    landscape frame (a portrait image is transposed first)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:  # widest grid whose rows still fit
        scale += 1
    scale -= 1
    new_w = scale * crop
    new_h = max(1, int(new_w / ratio))
    return transposed, new_w, new_h, math.ceil(new_h / crop) * crop


def hd_grid(width: int, height: int, num_crops: int, crop: int) -> tuple[int, int]:
    """(rows, columns) of ``crop``-px crops the HD transform makes of a ``width x height`` image."""
    transposed, new_w, _, target_h = hd_layout(width, height, num_crops, crop)
    rows, cols = target_h // crop, new_w // crop
    return (cols, rows) if transposed else (rows, cols)


def hd_transform(image, num_crops: int, crop: int):
    """Resize + white-pad so the image is a ``h x w`` grid of ``crop``-px crops, ``h*w <= num_crops``."""
    from PIL import Image

    transposed, new_w, new_h, target_h = hd_layout(image.width, image.height, num_crops, crop)
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (new_w, target_h), (255, 255, 255))
    canvas.paste(image, (0, (target_h - new_h) // 2))
    return canvas.transpose(Image.Transpose.TRANSPOSE) if transposed else canvas


def num_image_tokens(h: int, w: int, merged_side: int) -> int:
    """Tokens for an ``h x w`` crop grid; ``merged_side`` = 12 for the official model."""
    m = merged_side
    return (h * w + 1) * m * m + 1 + (h + 1) * m


class Phi3VChunkProcessor(ChunkProcessor):
    def __init__(self, tokenizer, num_crops: int, crop: int, merged_side: int, append_eos: bool = True,
                 max_length: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.end = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
        self.num_crops, self.crop, self.merged_side = num_crops, crop, merged_side

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _pixels(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        import numpy as np

        hd = hd_transform(image.convert("RGB"), self.num_crops, self.crop)
        t = torch.from_numpy(np.asarray(hd, dtype=np.float32) / 255.0).permute(2, 0, 1)
        t = (t - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
        c = self.crop
        H, W = t.shape[1:]
        glb = torch.nn.functional.interpolate(t[None], size=(c, c), mode="bicubic", align_corners=False)
        crops = t.reshape(3, H // c, c, W // c, c).permute(1, 3, 0, 2, 4).reshape(-1, 3, c, c)
        pix = torch.zeros(self.num_crops + 1, 3, c, c)
        pix[: 1 + crops.shape[0]] = torch.cat([glb, crops])
        return pix, (H, W)

    def _row(self, item: Item, grids: dict[int, tuple[int, int]] | None = None) -> list[int]:
        """The item's token ids; each image's tokens from its crop grid (``grids``: index in ``visuals(item)``
        -> grid; by arithmetic on the image sizes when not given)."""
        bos = [self.tokenizer.bos_token_id] if getattr(self.tokenizer, "add_bos_token", False) else []
        if not item.has_visual:
            _common.check_text_only(item.text or "", FAMILY)
            row = bos + self._ids(item.text or "") + self.end
            if self.max_length is not None:  # VLM2Vec --max_len: cuts text-only inputs, the end kept
                row = row[: max(0, self.max_length - len(self.end))] + self.end if len(row) > self.max_length else row
            return row
        if grids is None:
            grids = {k: hd_grid(im.width, im.height, self.num_crops, self.crop) for k, im in enumerate(visuals(item))}
        row = list(bos)
        for piece in phi_pieces(item):
            row += self._ids(piece) if isinstance(piece, str) else [-1] * num_image_tokens(*grids[piece], self.merged_side)
        return row + self.end

    def refusal(self, item: Item) -> str | None:
        """Placeholders that do not match the item's visuals, an item over ``max_tokens``."""
        return refusal_by_length(self, item)

    def num_tokens(self, item: Item) -> int:
        """The processed length by arithmetic (each image's HD crop grid from its size)."""
        return len(self._row(item))

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        rows, pixels, grids = [], [], []
        for item in items:
            item_grids = {}
            for k in placed_order(item):  # pixels in the order their tokens come (masked_scatter's order)
                pix, (H, W) = self._pixels(visuals(item)[k])
                pixels.append(pix)
                item_grids[k] = (H // self.crop, W // self.crop)
                grids.append(item_grids[k])
            rows.append(self._row(item, item_grids or None))
        if any(len(r) == 0 for r in rows):
            raise ValueError(f"{FAMILY}: an item tokenized to nothing")
        input_ids, attention_mask = _common.pad_right(rows, self.tokenizer.pad_token_id)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
            out["image_sizes"] = torch.tensor([[h * self.crop, w * self.crop] for h, w in grids], dtype=torch.long)
            # known here, read on the host by the forward: no device->host sync there
            out["image_grids"] = [list(g) for g in grids]
            out["image_token_index"] = (input_ids.reshape(-1) < 0).nonzero().squeeze(1)
        return out


def visuals(item: Item) -> tuple:
    """The images Phi-3.5-V encodes for an item, in order: its images, or its video's frames."""
    return item.video.images if item.video is not None else item.images


def placed_order(item: Item) -> list[int]:
    """Indices into ``visuals(item)`` in the order the prompt places them (``<|image_2|> ... <|image_1|>``
    puts the second image first)."""
    return [p for p in phi_pieces(item) if not isinstance(p, str)] if item.has_visual else []


def phi_pieces(item: Item) -> list:
    r"""The item's prompt as text pieces and indices into ``visuals(item)``.

    Images take their places (``schema.segments``); where the text places none, they lead it, each followed
    by "\n" (the layout of Phi-3.5-vision-instruct's model card for several images,
    ``<|image_1|>\n<|image_2|>\n...{text}``; one image: ``<|image_1|>\n{text}`` as before). A video
    is its frames as images ``<|image_1|>\n...\n<|image_n|>`` at the video's place: Phi-3.5-V has no
    video input, and VLM2Vec feeds it frames as images."""
    out: list = []
    for piece in _common.visual_pieces(item, "\n"):
        if isinstance(piece, str) or piece[0] == "image":
            out.append(piece if isinstance(piece, str) else piece[1])
            continue
        for f in range(len(item.video.images)):
            out += ["\n", f] if f else [f]
    return _common.join_text(out)


@register("backbone", FAMILY)
class Phi3V(Backbone):
    """Phi-3.5-Vision (Phi3Model + CLIP ViT-L/14-336 + HD crops + MLP projector), official key layout.

    ``path``: the official checkpoint (a local copy or a hub id; its remote code is never run), or a PEFT
    LoRA/DoRA adapter folder over it (VLM2Vec's released Phi-3.5-V checkpoints, whose DoRA also adapts the
    CLIP tower's attention): ``adapter_config.json``'s ``base_model_name_or_path`` names the base (absolute,
    relative to the adapter folder, or a hub id); the adapter's official module names map through ``map_key`` and it
    is merged on load (``checkpoints/peft.py``).

    ``num_crops``: the HD transform's crop budget (reference: 4 for Phi-3.5-V, 16 for Phi-3-V).
    ``append_eos``: end every sequence with the EOS token (the state last-token pooling reads).
    ``max_length``: text-only items are cut to this many tokens; items with an image are never cut, as in
    VLM2Vec's Phi-3-V processor (``--max_len`` truncates text-only inputs only). None: no limit.
    """

    lora_target = r"^language_model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))$"
    vision_prefixes = ("vision_tower.",)
    projector_prefixes = ("projector.", "glb_GN", "sub_GN")

    def __init__(
        self,
        seed: int,
        path: Optional[str] = None,
        tiny: bool = False,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str = "sdpa",
        attention: Literal["causal", "bidirectional"] = "causal",
        freeze_vision: bool = True,
        train_projector: bool = False,
        gradient_checkpointing: bool = False,
        append_eos: bool = True,
        num_crops: int = 4,
        max_length: Optional[int] = None,
    ):
        super().__init__()
        one_source(FAMILY, path, tiny)
        checkpoint = None if tiny else open_checkpoint(path, FAMILY)
        self.num_crops = num_crops
        self.max_length = max_length
        self.append_eos = append_eos
        if tiny:
            self.tokenizer = _tiny_tokenizer()
            config = _tiny_config(self.tokenizer)
            with seeded(seed):
                self._build(config, attn_implementation)
        else:
            config = checkpoint.config()
            check_model_type(config, checkpoint.path, FAMILY, (FAMILY,))
            with empty_weights(torch_dtype(dtype)):  # the checkpoint fills every weight
                self._build(config, attn_implementation)
            raw = checkpoint.weights()
            if "model.embed_tokens.weight" in raw:  # wte is only an alias of it
                raw.pop(WTE_ALIAS, None)
            load_mapped(self, raw, self.map_key, root=checkpoint.path, what=FAMILY, source_key=official_key)
            self.tokenizer = checkpoint.tokenizer()
        self.config = config
        set_attention(self.language_model, attention, FAMILY)
        self.finish_init(tiny=tiny, dtype=dtype, freeze_vision=freeze_vision, train_projector=train_projector,
                         gradient_checkpointing=gradient_checkpointing)
        if checkpoint is not None:
            checkpoint.merge_adapter(self, self.map_key)

    @staticmethod
    def check_config(params: dict) -> None:
        if params.get("num_crops", 1) < 1:
            raise ValueError("num_crops: must be >= 1")
        if params.get("max_length") is not None and params["max_length"] < 1:
            raise ValueError("max_length: must be >= 1")

    # -- construction and loading ------------------------------------------------------------------

    def _build(self, config: dict, attn_implementation: str) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3Model

        embd = config.get("embd_layer", {})
        if embd.get("hd_transform_order", "sub_glb") != "sub_glb" or not embd.get("use_hd_transform", True):
            raise UserError(f"model.backbone.path: {FAMILY} supports the HD transform in 'sub_glb' order only")
        text_fields = {k: v for k, v in config.items() if k not in _TEXT_SKIP}
        rope = text_fields.get("rope_scaling")
        if isinstance(rope, dict) and rope.get("type") == "su":  # "su" is LongRoPE's old name
            text_fields["rope_scaling"] = {**rope, "type": "longrope"}
        text_cfg = Phi3Config(**text_fields)
        img = config.get("img_processor", {})
        vision_cfg = CLIPVisionConfig(**img.get("embedkit_vision_config", CLIP_L_336))
        text_cfg._attn_implementation = attn_implementation
        vision_cfg._attn_implementation = attn_implementation
        self.language_model = Phi3Model(text_cfg)
        self.vision_tower = CLIPVisionModel(vision_cfg)
        c = vision_cfg.hidden_size
        self.glb_GN = nn.Parameter(0.02 * torch.randn(1, 1, 4 * c))  # loaded checkpoints overwrite these
        self.sub_GN = nn.Parameter(0.02 * torch.randn(1, 1, 1, 4 * c))
        self.projector = nn.Sequential(
            nn.Linear(4 * c, text_cfg.hidden_size), nn.GELU(), nn.Linear(text_cfg.hidden_size, text_cfg.hidden_size)
        )
        self.feature_layer = int(img.get("layer_idx", -2))
        self.crop = vision_cfg.image_size
        self.merged_side = vision_cfg.image_size // vision_cfg.patch_size // 2
        self.hidden_size = text_cfg.hidden_size
        self.num_layers = text_cfg.num_hidden_layers

    @staticmethod
    def map_key(key: str) -> str | None:
        """Official checkpoint key -> this module's key (None: dropped)."""
        vis = _VISION_EMBED
        if key == "lm_head.weight" or key.endswith("position_ids"):
            return None
        if key == WTE_ALIAS:
            return "language_model.embed_tokens.weight"
        if key.startswith(vis + "img_processor.vision_model."):
            return "vision_tower." + key[len(vis + "img_processor.vision_model."):]
        if key.startswith(vis + "img_projection."):
            return "projector." + key[len(vis + "img_projection."):]
        if key in (vis + "glb_GN", vis + "sub_GN"):
            return key[len(vis):]
        if key.startswith("model."):
            return "language_model." + key[len("model."):]
        return key  # unknown: reported as unmatched

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """This module's weights under the official key names (the inverse of ``map_key``)."""
        return {official_key(key, strict=True): value.detach().contiguous() for key, value in self.state_dict().items()}

    def save_pretrained(self, directory: str) -> None:
        """Official-layout ``config.json`` + ``model.safetensors`` + tokenizer files."""
        from safetensors.torch import save_file

        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.json").write_text(json.dumps(self.config, indent=2))
        save_file(self.official_state_dict(), str(root / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(str(root))

    # -- the contract ------------------------------------------------------------------------------

    def make_processor(self) -> Phi3VChunkProcessor:
        processor = Phi3VChunkProcessor(self.tokenizer, self.num_crops, self.crop, self.merged_side,
                                        self.append_eos, max_length=self.max_length)
        # admission (``refusal``): no item longer than the language model's positions
        processor.max_tokens = getattr(self.language_model.config, "max_position_embeddings", None)
        return processor

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                       grids: list | None = None) -> torch.Tensor:
        """All images' projected token features, concatenated in order: ``[sum of tokens, hidden]``.
        ``grids``: each image's crop grid (h, w), as the processor gives it (else read from ``image_sizes``)."""
        if grids is None:
            grids = [(int(H) // self.crop, int(W) // self.crop) for H, W in image_sizes.tolist()]
        crops = torch.cat([pixel_values[i, : 1 + h * w] for i, (h, w) in enumerate(grids)])
        out = self.vision_tower(crops.to(self.projector[0].weight.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer][:, 1:]  # drop CLS: [N, side*side, C]
        m = self.merged_side
        n, _, c = feats.shape
        # concatenate each 2x2 block of patches: [N, m, m, 4C]
        feats = feats.reshape(n, m, 2, m, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, m, m, 4 * c)
        pieces, start = [], 0
        for h, w in grids:
            glb, sub = feats[start], feats[start + 1: start + 1 + h * w]
            start += 1 + h * w
            sub = sub.reshape(h, w, m, m, 4 * c).permute(0, 2, 1, 3, 4).reshape(h * m, w * m, 4 * c)
            sub = torch.cat([sub, self.sub_GN[0].expand(h * m, 1, 4 * c)], dim=1).reshape(-1, 4 * c)
            glb = torch.cat([glb, self.sub_GN[0].expand(m, 1, 4 * c)], dim=1).reshape(-1, 4 * c)
            pieces.append(torch.cat([sub, self.glb_GN[0], glb]))
        return self.projector(torch.cat(pieces))

    def forward(self, inputs: dict[str, Any], output_all_layers: bool = False) -> BackboneOutput:
        ids = inputs["input_ids"]
        image_mask = ids < 0
        embeds = self.language_model.embed_tokens(ids.clamp(min=0))
        if "pixel_values" in inputs:
            feats = self.image_features(inputs["pixel_values"], inputs["image_sizes"],
                                        inputs.get("image_grids")).to(embeds.dtype)
            index = inputs.get("image_token_index")
            if index is None:  # a chunk from elsewhere: locate the image tokens on the device
                index = image_mask.reshape(-1).nonzero().squeeze(1)
            if feats.shape[0] != index.shape[0]:
                raise ValueError(f"{FAMILY}: {index.shape[0]} image tokens but {feats.shape[0]} image features")
            # what masked_scatter does, at positions known on the host (no count read back)
            embeds = embeds.reshape(-1, embeds.shape[-1]).index_copy(0, index, feats).view_as(embeds)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], use_cache=False,
            output_hidden_states=output_all_layers, return_dict=True,
        )
        result = BackboneOutput(
            out.last_hidden_state, inputs["attention_mask"], tuple(out.hidden_states) if output_all_layers else None
        )
        if "pixel_values" in inputs:
            return result
        return _common.keep_vision_in_graph(self, result, self._dummy_vision)

    def _dummy_vision(self) -> torch.Tensor:
        """The vision path on one blank 1 x 1 crop grid (global view + one crop): its projected features."""
        c = self.crop
        pixels = torch.zeros(1, 2, 3, c, c, device=self.projector[0].weight.device)
        return self.image_features(pixels, torch.tensor([[c, c]]), grids=[(1, 1)])


def official_key(key: str, strict: bool = False) -> str:
    """This module's key -> the official checkpoint key it is saved under (``strict``: an unknown key
    is a bug; else it comes back unchanged, for error messages)."""
    vis = _VISION_EMBED
    for ours, official in (("vision_tower.", vis + "img_processor.vision_model."), ("projector.", vis + "img_projection."),
                           ("language_model.", "model.")):
        if key.startswith(ours):
            return official + key[len(ours):]
    if key in ("glb_GN", "sub_GN"):
        return vis + key
    if strict:
        raise AssertionError(f"unmapped key {key}")
    return key


def _tiny_tokenizer():
    from embedkit.backbones.processors import tiny_tokenizer

    return tiny_tokenizer(["<|user|>", "<|assistant|>"], pad="<|endoftext|>", eos="<|end|>")


def _tiny_config(tokenizer) -> dict:
    """An official-style config.json dict with a tiny Phi-3 and a tiny CLIP (4 tokens per crop)."""
    return {
        "model_type": "phi3_v",
        "architectures": ["Phi3VForCausalLM"],
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
        "embd_layer": dict(EMBD_LAYER),
        "img_processor": {
            "image_dim_out": 32, "model_name": "tiny-clip", "name": "clip_vision_model", "num_img_tokens": 4,
            "embedkit_vision_config": dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=28, patch_size=7, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            ),
        },
    }
