"""Loading real checkpoints (hub id or local folder) with one-line errors for user mistakes."""

from __future__ import annotations

from pathlib import Path

from embedkit.errors import UserError

#: family -> the transformers model_type values it accepts
MODEL_TYPES = {
    "qwen2_vl": ("qwen2_vl", "qwen2_5_vl"),
}


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
        families = ", ".join(sorted(MODEL_TYPES))
        raise UserError(
            f"model.backbone.path: {path} holds a {config.model_type!r} model, not {family} "
            f"(types {', '.join(accepted)}); supported families: {families}"
        )


def load_pretrained(path, family, dtype, attn_implementation, *, image_processor_cls, image_processor_kwargs):
    """(model without LM head, tokenizer, image processor) from a hub id or local folder."""
    from transformers import AutoModel, AutoTokenizer

    path = check_path(path, family)
    check_model_type(path, family)
    model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = image_processor_cls.from_pretrained(path, **image_processor_kwargs)
    return model, tokenizer, image_processor
