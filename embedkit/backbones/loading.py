"""Loading real checkpoints (hub id or local folder) with one-line errors for user mistakes.

``model.backbone.path`` may hold, besides the transformers layout of the family, a layout converted by
key on load (``_layouts``, detected from the folder's files):

- ``config.json`` with ``model_type: llava_qwen`` (LLaVA-NeXT, e.g. ``BAAI/Aquila-VL-2B-llava-qwen`` and
  LLaVE's released models) for ``llava_onevision``;
- ``adapter_config.json`` + ``adapter_model.safetensors`` (a PEFT LoRA/DoRA adapter, e.g. VLM2Vec's
  released checkpoints) for every VLM family: the base model it names is loaded, then the adapter is
  merged into it (``open_adapter`` at the start of a family's constructor, ``merge`` at its end).
"""

from __future__ import annotations

from pathlib import Path

from embedkit.errors import UserError

#: family -> the transformers model_type values it accepts
MODEL_TYPES = {
    "qwen2_vl": ("qwen2_vl", "qwen2_5_vl"),
    "llava_onevision": ("llava_onevision",),
}


def supported_families() -> str:
    """Every registered backbone name (the families a user can pick)."""
    from embedkit.config import registry

    return ", ".join(registry.choices("backbone"))


def check_path(path: str | None, family: str) -> str:
    if not path:
        raise UserError(f"model.backbone.path: required for {family} unless model.backbone.tiny=true")
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.is_dir():
        raise UserError(f"model.backbone.path: {path} does not exist")
    return str(local) if looks_local else path


def check_model_type(path: str, family: str) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"model.backbone.path: cannot read a model config from {path} ({str(exc).splitlines()[0]})") from None
    accepted = MODEL_TYPES.get(family, (family,))
    if config.model_type not in accepted:
        families = supported_families()
        raise UserError(
            f"model.backbone.path: {path} holds a {config.model_type!r} model, not {family} "
            f"(types {', '.join(accepted)}); supported families: {families}"
        )


def load_tokenizer(path: str):
    """The tokenizer saved at ``path``, as saved.

    ``AutoTokenizer`` swaps a saved generic fast tokenizer (``tokenizer_class: TokenizersBackend``) for
    the model type's own class when it deems the declared class wrong (e.g. ``Qwen2Tokenizer`` for
    ``qwen2``), which rebuilds a different pipeline from the vocabulary: a tiny word-level tokenizer
    saved and loaded back then splits words into characters (docs/bugs-and-fixes.md).
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = Path(path) / "tokenizer_config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("tokenizer_class") in (
        "TokenizersBackend", "PreTrainedTokenizerFast"
    ):
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def load_pretrained(path, family, dtype, attn_implementation, *, image_processor_cls, image_processor_kwargs):
    """(model without LM head, tokenizer, image processor) from a hub id or local folder."""
    from transformers import AutoModel

    from embedkit.backbones import _layouts

    path = check_path(path, family)
    if family == "llava_onevision" and _layouts.layout(path) == _layouts.LLAVA_QWEN:
        return _layouts.load_llava_qwen(path, dtype, attn_implementation)
    check_model_type(path, family)
    model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    # from_pretrained returns eval mode and Lightning keeps submodules' modes: dropout would stay off
    model.train()
    tokenizer = load_tokenizer(path)
    image_processor = image_processor_cls.from_pretrained(path, **image_processor_kwargs)
    return model, tokenizer, image_processor


def open_adapter(path: str | None, family: str):
    """``(base path, adapter)`` when ``path`` holds a PEFT adapter, else ``(path, None)``."""
    if not path:
        return path, None
    from embedkit.backbones import _layouts

    adapter = _layouts.read_adapter(check_path(path, family))
    return (path, None) if adapter is None else (adapter.base, adapter)


def merge(backbone, adapter, map_module, family: str) -> None:
    """Merge ``adapter`` (from ``open_adapter``; None: nothing) into the loaded ``backbone``."""
    if adapter is not None:
        from embedkit.backbones import _layouts

        _layouts.merge_adapter(backbone, adapter, map_module, family)
