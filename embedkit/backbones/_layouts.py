"""Checkpoint layouts other than the transformers one, converted by key on load.

Not a component (the leading underscore keeps the registry from importing it as one). ``loading``
detects the layout of ``model.backbone.path`` and calls in here; the families never name a layout.

**LLaVA-NeXT ``llava_qwen``** (``config.json`` ``model_type: llava_qwen``: the LLaVA-NeXT / LLaVA-OneVision
training code's own format, in which ``BAAI/Aquila-VL-2B-llava-qwen``, ``lmms-lab/llava-onevision-qwen2-*-ov``
and LLaVE's released checkpoints are published) loads into transformers' ``LlavaOnevisionModel``::

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

**PEFT adapters** (a folder with ``adapter_config.json`` + ``adapter_model.safetensors``, as VLM2Vec
releases its LoRA checkpoints: ``MMEBModel.save`` calls the ``PeftModel``'s ``save_pretrained``, so keys
read ``base_model.model.<base model key>.lora_{A,B}.weight`` and ``...lora_magnitude_vector`` for DoRA):
the base model named by ``base_model_name_or_path`` is loaded, each adapted module's name is mapped
into the backbone by the family's key map, the adapter is injected with the saved rank, alpha and
DoRA setting, loaded with strict key checks and merged into the base weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from embedkit.backbones import _common
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


# -- reading a folder -------------------------------------------------------------------------------


def local_file(path: str, name: str) -> Optional[Path]:
    """``name`` inside a local folder or a hub id's cached snapshot; None when it is not there."""
    root = Path(path).expanduser()
    if root.is_dir():
        return root / name if (root / name).is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(found) if found else None


def read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"model.backbone.path: {file} is not valid JSON ({exc})") from None


def layout(path: str) -> str:
    """``peft`` (adapter_config.json), ``llava_qwen`` (config.json model_type) or ``hf``."""
    if local_file(path, "adapter_config.json"):
        return "peft"
    config = local_file(path, "config.json")
    if config and read_json(config).get("model_type") == LLAVA_QWEN:
        return LLAVA_QWEN
    return "hf"


def local_dir(path: str) -> Path:
    root = Path(path).expanduser()
    if root.is_dir():
        return root
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path))


def read_safetensors(root: Path, stem: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``<stem>.safetensors`` or of the shards its ``.index.json`` lists."""
    from safetensors.torch import load_file

    index = root / f"{stem}.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (root / f"{stem}.safetensors").is_file():
        files = [f"{stem}.safetensors"]
    else:
        raise UserError(f"model.backbone.path: {root} has no {stem}.safetensors(.index.json)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(root / f)))
    return out


def key_error(root, what: str, unmatched: list[str], missing: list[str]) -> UserError:
    parts = []
    if unmatched:
        parts.append(f"{len(unmatched)} unmatched keys {unmatched[:3]}")
    if missing:
        parts.append(f"{len(missing)} missing keys {missing[:3]}")
    return UserError(f"model.backbone.path: {root} does not match the {what} layout ({'; '.join(parts)})")


# -- LLaVA-NeXT llava_qwen -> LlavaOnevisionModel ---------------------------------------------------


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


def load_llava_qwen(path: str, dtype: torch.dtype, attn_implementation: str):
    """(``LlavaOnevisionModel``, tokenizer, image processor) from a llava_qwen checkpoint, strictly."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionModel
    from transformers.initialization import no_init_weights

    from embedkit.backbones.loading import load_tokenizer

    root = local_dir(path)
    cfg = read_json(root / "config.json")
    raw = read_safetensors(root, "model")
    state = {}
    for key, value in raw.items():
        new = llava_qwen_key(key)
        if new is not None:
            state[new] = value
    try:
        tokenizer = load_tokenizer(str(root))
    except (OSError, ValueError) as exc:
        raise UserError(f"model.backbone.path: cannot load the tokenizer of {root} ({str(exc).splitlines()[0]})") from None
    rows = state.get("language_model.embed_tokens.weight")
    if rows is None:
        raise key_error(root, LLAVA_QWEN, [], ["model.embed_tokens.weight"])
    image_id, video_id = ensure_image_tokens(tokenizer, rows.shape[0], root)
    config = llava_onevision_config(cfg, raw, image_id, video_id)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    with no_init_weights(), _common.default_dtype(dtype):  # the checkpoint fills every weight
        model = LlavaOnevisionModel(config)
    expected = set(model.state_dict())
    unmatched = sorted(k for k, v in raw.items() if llava_qwen_key(k) is not None and llava_qwen_key(k) not in expected)
    missing = sorted(llava_qwen_source(k) for k in expected - set(state))
    if unmatched or missing:
        raise key_error(root, LLAVA_QWEN, unmatched, missing)
    model.load_state_dict(state, strict=True)
    model.train()
    tile = config.vision_config.image_size
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD),
    )
    return model, tokenizer, image_processor


def llava_qwen_source(key: str) -> str:
    """``LlavaOnevisionModel`` key -> the llava_qwen key it is read from (for error messages)."""
    for new, old in (("vision_tower.", _VISION), ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                     ("multi_modal_projector.linear_2.", "model.mm_projector.2."), ("language_model.", "model."),
                     ("image_newline", "model.image_newline")):
        if key.startswith(new):
            return old + key[len(new):]
    return key


# -- PEFT adapters --------------------------------------------------------------------------------

_WRAPPER = "base_model.model."
_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$")


@dataclass
class Adapter:
    root: Path
    base: str  # the base model's path or hub id
    config: dict  # adapter_config.json
    tensors: dict[str, torch.Tensor]  # as saved: base_model.model.<base module>.<lora kind>


def read_adapter(path: str) -> Optional[Adapter]:
    """The PEFT adapter at ``path`` (None when ``path`` holds none)."""
    file = local_file(path, "adapter_config.json")
    if file is None:
        return None
    root = local_dir(path)
    config = read_json(file)
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"model.backbone.path: {root} holds a {config['peft_type']} adapter; only LoRA/DoRA loads")
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"model.backbone.path: {file} names no base_model_name_or_path")
    if not Path(base).expanduser().exists() and (root / base).exists():
        base = str(root / base)  # a base given relative to the adapter folder
    return Adapter(root, base, config, read_safetensors(root, "adapter_model"))


def merge_adapter(backbone, adapter: Adapter, map_module: Callable[[str], Optional[str]], family: str) -> None:
    """Inject ``adapter`` into ``backbone`` under the names ``map_module`` gives (base-model module name
    -> backbone module name; None: no such module), load it strictly and merge it into the weights."""
    from peft import LoraConfig, inject_adapter_in_model

    from embedkit.backbones.lora import lora_layers

    cfg = adapter.config
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise UserError(f"model.backbone.path: {adapter.root}: adapter_config {field} is not supported")
    modules = dict(backbone.named_modules())
    state, unmatched = {}, []
    for key, value in adapter.tensors.items():
        m = _ADAPTER_KEY.match(key[len(_WRAPPER):]) if key.startswith(_WRAPPER) else None
        name = map_module(m["module"]) if m else None
        if name is None or not isinstance(modules.get(name), torch.nn.Linear):
            unmatched.append(key)
            continue
        state[f"{name}.{m['kind']}.default.weight"] = value
    if unmatched or not state:
        raise key_error(adapter.root, f"{family} adapter", sorted(unmatched), [] if state else ["(no LoRA weights)"])
    targets = sorted({k.rsplit(".", 3)[0] for k in state})
    config = LoraConfig(
        r=int(cfg.get("r", 8)), lora_alpha=float(cfg.get("lora_alpha", 8)), lora_dropout=0.0,
        use_dora=bool(cfg.get("use_dora", False)), use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules="^(?:" + "|".join(map(re.escape, targets)) + ")$", bias="none",
    )
    trainable = {n: p.requires_grad for n, p in backbone.named_parameters()}
    inject_adapter_in_model(config, backbone)
    expected = {k for k in backbone.state_dict() if ".lora_" in k}
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing or extra:
        raise key_error(adapter.root, f"{family} adapter", extra, missing)
    backbone.load_state_dict(state, strict=False)
    for name, layer in lora_layers(backbone):  # merged in float64, one layer at a time, then cast back
        dtype = layer.get_base_layer().weight.dtype
        layer.to(torch.float64).merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent) if parent else backbone, child, layer.get_base_layer().to(dtype))
    for n, p in backbone.named_parameters():
        p.requires_grad_(trainable.get(n, p.requires_grad))


def qwen2_vl_module(name: str) -> Optional[str]:
    """A Qwen2-VL ``...ForConditionalGeneration`` module name (transformers < 4.52: ``model.layers.*``,
    ``visual.*``; later: ``model.language_model.*``, ``model.visual.*``) -> the qwen2_vl backbone's."""
    if name.startswith(("model.language_model.", "model.visual.")):
        return name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    if name.startswith("visual."):
        return "model." + name
    return None


def llava_onevision_module(name: str) -> Optional[str]:
    """A llava_qwen or transformers LLaVA-OneVision module name -> the llava_onevision backbone's."""
    if name.startswith(("model.vision_tower.vision_tower.", "model.mm_projector.", "model.layers.",
                        "model.embed_tokens", "model.norm", "model.image_newline")):
        mapped = llava_qwen_key(name + ".weight")
        return None if mapped is None else "model." + mapped[: -len(".weight")]
    if name.startswith("language_model.model."):  # transformers < 4.52 ForConditionalGeneration
        return "model.language_model." + name[len("language_model.model."):]
    return name if name.startswith("model.") else None
