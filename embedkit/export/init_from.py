"""``embedkit fit init_from=RUN_DIR|EXPORT|CHECKPOINT``: a run that starts from another run's weights
(stage 2 of a multi-stage recipe) with a fresh optimizer and schedule. Weight surgery on a finished
model, beside ``export/merge.py``.

LoRA: merge-then-new-adapter. A parent trained with LoRA has its adapter folded into its base weights
(``backbones.lora.remove_lora(merge=True)``, as ``merge`` folds them); the new run loads those weights into
its base layers and, when its own config enables LoRA, trains a fresh adapter on top (zero-initialised
``lora_B``: the run starts exactly at the parent's function). Continuing the parent's adapter itself is not
offered: a new stage often changes ``r``, the targets or the data, and a folded base is always well defined
(docs/stages.md).

The architecture must match: the keys of ``ARCH_KEYS`` (and every ``model.pooling.*`` key) are compared
first, so a mismatch is one line naming the config key; a tensor that is still missing or of another shape
is one line naming the tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from embedkit.config.flat import flatten
from embedkit.errors import UserError

#: the model keys that decide which tensors a model has and their shapes
ARCH_KEYS = ("model.backbone.name", "model.backbone.path", "model.backbone.tiny", "model.backbone.tiny_hidden_size",
             "model.backbone.tiny_layers", "model.backbone.tiny_vision_layers")
WHAT = "init_from"


def parent_state(spec: str | Path, trust: bool = False) -> tuple[dict, dict[str, torch.Tensor], object]:
    """(the parent's training config, its encoder weights with any LoRA folded in, its ``Provenance``) of
    a run dir, checkpoint or export folder; one ``UserError`` line when it is none of those."""
    from embedkit.backbones.lora import lora_layers, remove_lora
    from embedkit.export.reader import open_model

    encoder, provenance = open_model(spec, what=WHAT, kinds=("checkpoint", "run", "export"), trust_checkpoint=trust)
    if lora_layers(encoder.backbone):
        remove_lora(encoder.backbone, merge=True)
    return provenance.config or {}, {k: v.detach().clone() for k, v in encoder.state_dict().items()}, provenance


def check_architecture(parent: dict, cfg: dict, spec: str | Path) -> None:
    """One line naming the first architecture key (``ARCH_KEYS``, ``model.pooling.*``) that differs."""
    mine, theirs = flatten({"model": cfg["model"]}), flatten({"model": parent.get("model") or {}})
    keys = [*ARCH_KEYS, *sorted(k for k in set(mine) | set(theirs) if k.startswith("model.pooling."))]
    for key in keys:
        if mine.get(key) != theirs.get(key):
            raise UserError(f"{WHAT}={spec}: {key} differs ({theirs.get(key)!r} in the parent, {mine.get(key)!r} "
                            "here); a stage starts from a model of the same architecture")


def load_parent(encoder: torch.nn.Module, state: dict[str, torch.Tensor], spec: str | Path) -> int:
    """Copy ``state`` (the parent's folded weights) into ``encoder`` (this run's, a fresh LoRA adapter
    possibly injected: its ``x.base_layer.weight`` takes the parent's ``x.weight``; its ``lora_*`` stay
    as initialised). Returns the tensors copied; one line naming a tensor that is missing or of another shape."""
    own = encoder.state_dict()
    copied = 0
    for key, value in own.items():
        if ".lora_" in key or "lora_magnitude" in key:
            continue
        source = key.replace(".base_layer.", ".")
        if source not in state:
            raise UserError(f"{WHAT}={spec}: the parent has no tensor {source}; a stage starts from a model of the "
                            "same architecture")
        if state[source].shape != value.shape:
            raise UserError(f"{WHAT}={spec}: {source} is {tuple(state[source].shape)} in the parent, "
                            f"{tuple(value.shape)} here; a stage starts from a model of the same architecture")
        with torch.no_grad():
            value.copy_(state[source].to(value.dtype))
        copied += 1
    return copied
