"""One way from ``model.backbone.path`` to weights, for every backbone family.

Layers, bottom to top (nothing imports upwards):

- ``files``: reading a checkpoint folder (``check_path``, ``read_config``, ``read_safetensors``,
  ``load_mapped``, ``key_error``, ``load_tokenizer``, ...), every user mistake a one-line ``UserError``;
- one module per foreign layout: ``llava_qwen`` (LLaVA-NeXT's own checkpoints, converted by key) and
  ``peft`` (LoRA/DoRA adapter folders, merged into their base on load);
- this front door: ``open_checkpoint`` resolves a path (an adapter folder resolves to its base) and
  ``load_pretrained`` loads a transformers-layout checkpoint, or hands a foreign layout to its converter.

A family passes what differs (its accepted ``model_type`` values, its image processor, its converters,
its key maps) and never has its name tested here. A family built in-project (Phi-3.5-V) reads its
weights with ``Checkpoint.weights`` + ``files.load_mapped`` and its own key map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from embedkit.backbones.checkpoints.files import (
    check_model_type,
    check_path,
    first_line,
    load_error,
    local_dir,
    read_config,
    read_safetensors,
    read_tokenizer,
    supported_families,
)
from embedkit.backbones.checkpoints.peft import Adapter, merge_adapter, read_adapter
from embedkit.errors import UserError

#: ``converter(path, dtype, attn_implementation) -> (model, tokenizer, image processor)``
Converter = Callable[[str, torch.dtype, str], tuple[Any, Any, Any]]


@dataclass(frozen=True)
class Checkpoint:
    """A resolved ``model.backbone.path``: the base model's folder or hub id, and the PEFT adapter over
    it when the path named an adapter folder."""

    family: str
    path: str
    adapter: Optional[Adapter] = None

    def config(self) -> dict:
        """The base's ``config.json`` as saved."""
        return read_config(self.path)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor of the base's ``model.safetensors`` (or its shards), under the saved names."""
        return read_safetensors(local_dir(self.path), "model")

    def tokenizer(self):
        return read_tokenizer(self.path)

    def merge_adapter(self, backbone, map_module: Callable[[str], Optional[str]]) -> None:
        """Merge the adapter (if any) into the built ``backbone``; ``map_module``: base-model module
        name -> backbone module name (None: no such module)."""
        if self.adapter is not None:
            merge_adapter(backbone, self.adapter, map_module, self.family)


def open_checkpoint(path: str | None, family: str, *, adapters: bool = True) -> Checkpoint:
    """``path`` checked (one-line error when it does not exist); a PEFT adapter folder opens its base
    (``adapters=False``: refused, for a family with no PEFT module-name map)."""
    path = check_path(path, family)
    adapter = read_adapter(path)
    if adapter is None:
        return Checkpoint(family, path)
    if not adapters:
        raise UserError(f"model.backbone.path: {adapter.root} holds a PEFT adapter; {family} loads full "
                        "checkpoints only (merge the adapter into its base first)")
    return Checkpoint(family, check_path(adapter.base, family), adapter)


def load_pretrained(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    attn_implementation: str,
    *,
    model_types: tuple[str, ...] | None = None,
    check: Callable[[Any, str], None] | None = None,
    image_processor: tuple[type, dict] | None = None,
    converters: dict[str, Converter] | None = None,
):
    """``(model without LM head, tokenizer, image processor or None)`` from a transformers checkpoint.

    ``model_types``: the ``config.json`` model types the family accepts (None: any transformers reads);
    ``check(config, path)``: the family's own refusal of a transformers config it cannot embed with;
    ``image_processor``: ``(class, kwargs)`` for ``from_pretrained``; ``converters``: model type ->
    loader of a foreign layout (``llava_qwen.load``), which then does all of the loading.
    """
    from transformers import AutoConfig, AutoModel

    path, family = checkpoint.path, checkpoint.family
    model_type = checkpoint.config().get("model_type")
    if converters and model_type in converters:
        return converters[model_type](path, dtype, attn_implementation)
    if model_types is not None:
        check_model_type({"model_type": model_type}, path, family, model_types)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"model.backbone.path: {path} is not a checkpoint transformers can read "
                        f"({first_line(exc)}); supported families: {supported_families()}") from None
    if check is not None:
        check(config, path)
    try:
        model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:
        raise load_error(path, family, exc) from None
    # from_pretrained returns eval mode and Lightning keeps submodules' modes: dropout would stay off
    model.train()
    tokenizer = checkpoint.tokenizer()
    processor = None
    if image_processor is not None:
        cls, kwargs = image_processor
        processor = cls.from_pretrained(path, **kwargs)
    return model, tokenizer, processor
