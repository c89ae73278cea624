"""LoRA / DoRA on a backbone's language model, through PEFT, in place.

``apply_lora(backbone, lora_cfg)`` takes the ``model.lora`` section (``LoraSection``: enabled, r,
alpha, dropout, dora, target, vision, init). When enabled, PEFT LoRA layers (Hu et al., arXiv
2106.09685; DoRA: Liu et al., arXiv 2402.09353) are injected into every module whose full name matches
the anchored regex ``target`` (default: the backbone's ``lora_target``, language model only); a target
matching vision-tower modules is refused unless ``vision=true`` (VLM2Vec's suffix-matched targets adapt
Phi-3.5-V's CLIP attention). ``init``: PEFT ``init_lora_weights`` (``default`` or ``gaussian``). Every
other weight is frozen, except the projector when the backbone was built with ``train_projector=true``.
When disabled (full fine-tuning) the backbone is returned unchanged: its constructor already froze the
vision tower (``freeze_vision``) and, unless ``train_projector``, the projector.

The backbone object stays the same class (``inject_adapter_in_model`` mutates it), so its
``forward`` and ``make_processor`` are unchanged and module names gain only the LoRA sub-modules.
"""

from __future__ import annotations

import re

from embedkit.backbones.base import Backbone, set_trainable
from embedkit.errors import ConfigError


def adapted_module_names(backbone: Backbone) -> set[str]:
    """Names of the modules that carry a LoRA adapter."""
    return {name for name, module in backbone.named_modules() if hasattr(module, "lora_A")}


def apply_lora(backbone: Backbone, lora_cfg: dict) -> Backbone:
    if not lora_cfg.get("enabled", False):
        return backbone
    from peft import LoraConfig, inject_adapter_in_model

    target = lora_cfg.get("target") or backbone.lora_target
    if not target:
        raise ConfigError(f"model.lora.target: backbone {type(backbone).__name__} declares no LoRA target; set one")
    try:
        pattern = re.compile(target)
    except re.error as exc:
        raise ConfigError(f"model.lora.target: invalid regex {target!r} ({exc})") from None
    names = [n for n, _ in backbone.named_modules() if pattern.fullmatch(n)]
    if not names:
        raise ConfigError(f"model.lora.target: {target!r} matches no module of the backbone")
    vision = tuple(getattr(backbone, "vision_prefixes", ()))
    if vision and not lora_cfg.get("vision", False) and any(n.startswith(vision) for n in names):
        raise ConfigError(f"model.lora.target: {target!r} matches vision-tower modules; "
                          "set model.lora.vision=true to adapt them too")
    config = LoraConfig(
        r=int(lora_cfg.get("r", 16)),
        lora_alpha=int(lora_cfg.get("alpha", 32)),
        lora_dropout=float(lora_cfg.get("dropout", 0.0)),
        use_dora=bool(lora_cfg.get("dora", False)),
        target_modules=target,  # a string: PEFT full-matches it against each module name
        # PEFT: True = Kaiming-uniform A, zero B; "gaussian" = A ~ N(0, 1/r), zero B (VLM2Vec)
        init_lora_weights=True if lora_cfg.get("init", "default") == "default" else "gaussian",
        bias="none",
    )
    inject_adapter_in_model(config, backbone)
    for name, param in backbone.named_parameters():
        param.requires_grad_("lora_" in name)
    if backbone.train_projector:
        set_trainable(backbone, backbone.projector_prefixes, True)
    return backbone


def lora_layers(backbone: Backbone) -> list[tuple[str, object]]:
    """``(name, PEFT LoRA layer)`` for every adapted module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in backbone.named_modules() if isinstance(m, BaseTunerLayer)]


def lora_is_zero(backbone: Backbone) -> bool:
    """True when the backbone has LoRA layers and every ``lora_B`` is still all zeros (PEFT's
    initialisation: the adapter adds nothing, so a run that leaves it so trained nothing)."""
    b = [p for n, p in backbone.named_parameters() if "lora_B" in n]
    return bool(b) and all(not bool(p.detach().any()) for p in b)


def lora_state_dict(backbone: Backbone) -> dict:
    """The adapter's own tensors (``lora_*``: A, B and DoRA magnitudes), by backbone-relative name."""
    return {n: t.detach().clone() for n, t in backbone.state_dict().items() if "lora_" in n}


def remove_lora(backbone: Backbone, merge: bool) -> Backbone:
    """Replace every LoRA layer by its base layer, in place; ``merge``: fold the adapter
    (LoRA or DoRA) into the base weight first (PEFT's ``merge``), else drop it."""
    for name, layer in lora_layers(backbone):
        if merge:
            layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        setattr(parent, child, layer.get_base_layer())
    return backbone
