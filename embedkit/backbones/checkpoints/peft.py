"""PEFT LoRA/DoRA adapters over a base checkpoint, read and merged on load.

A folder with ``adapter_config.json`` + ``adapter_model.safetensors``, as VLM2Vec releases its LoRA
checkpoints (``MMEBModel.save`` calls the ``PeftModel``'s ``save_pretrained``, so keys read
``base_model.model.<base model key>.lora_{A,B}.weight`` and ``...lora_magnitude_vector`` for DoRA).
``read_adapter`` finds the base model named by ``base_model_name_or_path``; once the family has built
that base, ``merge_adapter`` maps each adapted module's name into the backbone with the family's map,
injects the adapter with the saved rank, alpha and DoRA setting, loads it with strict key checks and
merges it into the base weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from embedkit.backbones.checkpoints.files import key_error, local_dir, local_file, read_json, read_safetensors
from embedkit.errors import UserError

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
