"""LLaVA-NeXT's ``llava_qwen`` checkpoints, converted by key into transformers' ``LlavaOnevisionModel``.

``config.json`` with ``model_type: llava_qwen`` is the LLaVA-NeXT / LLaVA-OneVision training code's own
format, in which ``BAAI/Aquila-VL-2B-llava-qwen``, ``lmms-lab/llava-onevision-qwen2-*-ov`` and LLaVE's
released checkpoints are published. The ``llava_onevision`` family hands this layout to ``load``
(``checkpoints.load_pretrained(..., converters={LLAVA_QWEN: llava_qwen.load})``)::

    model.embed_tokens.* / model.layers.* / model.norm.*    -> language_model.*
    model.vision_tower.vision_tower.vision_model.*          -> vision_tower.*  (transformers 5's SigLIP
                                                               tower has no vision_model level)
    model.mm_projector.0.* / model.mm_projector.2.*         -> multi_modal_projector.linear_1.* / linear_2.*
    model.image_newline                                     -> image_newline
    lm_head.weight, *.position_ids                          dropped (an encoder has no LM head)

The config's Qwen2 fields make the text config; the ``mm_*`` fields are checked (``mlp2x_gelu``
projector, ``spatial_unpad`` merge, ``anyres_max_N`` aspect policy) and give the grid pinpoints. The
vision tower is not described in ``config.json`` (``mm_vision_tower`` names a hub id): it is SigLIP
so400m/14-384 with as many layers as the weights hold (LLaVA-NeXT deletes SigLIP's last layer and its
pooling head and reads the last remaining layer: 26 layers, feature layer -1), unless the config holds
an ``embedkit_vision_config`` (a tiny checkpoint written by the tests). The images are normalised with
SigLIP's mean and std (0.5). The tokenizer gets ``<image>`` / ``<video>`` tokens when it lacks them
(LLaVA-NeXT marks images with the id -200 instead); their embedding rows are never read, because the
model overwrites image positions with image features.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from embedkit.backbones.checkpoints.files import (
    empty_weights,
    key_error,
    load_mapped,
    local_dir,
    read_json,
    read_safetensors,
    read_tokenizer,
)
from embedkit.errors import UserError

LLAVA_QWEN = "llava_qwen"
#: SigLIP so400m/14-384, the vision tower every llava_qwen OneVision checkpoint names (``mm_vision_tower``)
SIGLIP_SO400M_384 = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=384, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
#: the Qwen2 fields of a llava_qwen config.json (everything else is LLaVA's own)
_QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout",
    "bos_token_id", "eos_token_id", "tie_word_embeddings",
)
_VISION = "model.vision_tower.vision_tower.vision_model."
_EMBED = "model.embed_tokens.weight"


def llava_qwen_key(key: str) -> Optional[str]:
    """llava_qwen checkpoint key -> ``LlavaOnevisionModel`` key (None: dropped); unknown keys come back
    unchanged, and the strict load then reports them."""
    if key == "lm_head.weight" or key.endswith(".position_ids"):
        return None
    if key.startswith(_VISION):
        return "vision_tower." + key[len(_VISION):]
    for old, new in (("model.mm_projector.0.", "multi_modal_projector.linear_1."),
                     ("model.mm_projector.2.", "multi_modal_projector.linear_2.")):
        if key.startswith(old):
            return new + key[len(old):]
    if key == "model.image_newline":
        return "image_newline"
    for part in ("embed_tokens.", "layers.", "norm."):
        if key.startswith("model." + part):
            return "language_model." + key[len("model."):]
    return key


def llava_qwen_source(key: str) -> str:
    """``LlavaOnevisionModel`` key -> the llava_qwen key it is read from (for error messages)."""
    for new, old in (("vision_tower.", _VISION), ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                     ("multi_modal_projector.linear_2.", "model.mm_projector.2."), ("language_model.", "model."),
                     ("image_newline", "model.image_newline")):
        if key.startswith(new):
            return old + key[len(new):]
    return key


def grid_pinpoints(value, tile: int) -> list[list[int]]:
    """``image_grid_pinpoints`` as a list of [h, w] pixels; LLaVA-NeXT's string form ``"(1x1),...,(AxB)"``
    spans every grid from 1x1 to AxB tiles."""
    if isinstance(value, str):
        grids = re.findall(r"\((\d+)x(\d+)\)", value)
        if not grids:
            raise UserError(f"model.backbone.path: image_grid_pinpoints {value!r} is not understood")
        (a0, b0), (a1, b1) = [tuple(map(int, g)) for g in (grids[0], grids[-1])]
        return [[tile * i, tile * j] for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    return [list(map(int, p)) for p in value]


def llava_onevision_config(cfg: dict, state: dict[str, torch.Tensor], image_token_id: int, video_token_id: int):
    """The ``LlavaOnevisionConfig`` equivalent to a llava_qwen config.json and its weights."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    checks = {"mm_projector_type": ("mlp2x_gelu",), "mm_patch_merge_type": ("spatial_unpad",)}
    for field, accepted in checks.items():
        if cfg.get(field, accepted[0]) not in accepted:
            raise UserError(f"model.backbone.path: llava_qwen {field}={cfg[field]!r} is not supported "
                            f"(llava_onevision: {', '.join(accepted)})")
    aspect = cfg.get("image_aspect_ratio", "anyres_max_9")
    if not re.fullmatch(r"anyres_max_\d+", str(aspect)):
        raise UserError(f"model.backbone.path: llava_qwen image_aspect_ratio={aspect!r} is not supported "
                        "(llava_onevision: anyres_max_N)")
    vision_fields = dict(cfg.get("embedkit_vision_config") or SIGLIP_SO400M_384)
    layers = {int(m.group(1)) for k in state for m in [re.match(re.escape(_VISION) + r"encoder\.layers\.(\d+)\.", k)] if m}
    if not layers:
        raise UserError("model.backbone.path: the llava_qwen checkpoint holds no vision-tower layers "
                        f"({_VISION}encoder.layers.*)")
    vision_fields["num_hidden_layers"] = max(layers) + 1  # LLaVA-NeXT drops SigLIP's last layer
    vision = SiglipVisionConfig(**vision_fields, vision_use_head=False)
    if cfg.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise UserError(f"model.backbone.path: llava_qwen mm_hidden_size={cfg['mm_hidden_size']} does not match the "
                        f"SigLIP tower's width {vision.hidden_size}")
    text = Qwen2Config(**{k: cfg[k] for k in _QWEN2_FIELDS if k in cfg})
    pinpoints = grid_pinpoints(cfg.get("image_grid_pinpoints") or [[vision.image_size] * 2], vision.image_size)
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, video_token_index=video_token_id,
        image_grid_pinpoints=pinpoints, vision_aspect_ratio=aspect,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )


def ensure_image_tokens(tokenizer, vocab_rows: int, root) -> tuple[int, int]:
    """Ids of ``<image>`` and ``<video>``, added as special tokens when the tokenizer lacks them."""
    from tokenizers import AddedToken

    missing = [t for t in ("<image>", "<video>") if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<video>")
    if max(ids) >= vocab_rows:
        raise UserError(f"model.backbone.path: {root}: no free embedding row for <image>/<video> "
                        f"(tokenizer {len(tokenizer)} tokens, embedding {vocab_rows} rows)")
    return ids


def load(path: str, dtype: torch.dtype, attn_implementation: str):
    """(``LlavaOnevisionModel``, tokenizer, image processor) from a llava_qwen checkpoint, strictly."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionModel

    root = local_dir(path)
    cfg = read_json(root / "config.json")
    raw = read_safetensors(root, "model")
    tokenizer = read_tokenizer(str(root))
    if _EMBED not in raw:
        raise key_error(root, LLAVA_QWEN, [], [_EMBED])
    image_id, video_id = ensure_image_tokens(tokenizer, raw[_EMBED].shape[0], root)
    config = llava_onevision_config(cfg, raw, image_id, video_id)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    with empty_weights(dtype):
        model = LlavaOnevisionModel(config)
    load_mapped(model, raw, llava_qwen_key, root=root, what=LLAVA_QWEN, source_key=llava_qwen_source)
    model.train()
    tile = config.vision_config.image_size
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD),
    )
    return model, tokenizer, image_processor
