"""``load(path)``: the ``Encoder`` of an export folder, a run dir or an ``embedkit fit`` checkpoint."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from embedkit.encoder import Encoder, skip_final_norm
from embedkit.errors import UserError
from embedkit.export import FORMAT_VERSION, META

ADAPTER = "embedkit_adapter.safetensors"  # backbone-relative LoRA tensor names (not PEFT's)
POOLING = "pooling.safetensors"


def load(path: str | Path, device: str | None = None, layer: int | None = None, dim: int | None = None) -> Encoder:
    """An ``Encoder`` in eval mode, from an export folder, a run dir or a checkpoint file; ``layer``,
    ``dim``: cut to that depth and embedding size (``Encoder.cut``; the layers above are dropped), so
    ``encode`` gives what the full model's ``encode(layer=layer, dim=dim)`` gives."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / META).is_file():
        encoder = from_export(path)
    elif path.is_dir() and (path / "checkpoints" / "last.ckpt").is_file():
        encoder = Encoder.from_checkpoint(path / "checkpoints" / "last.ckpt")
    elif path.is_file():
        encoder = Encoder.from_checkpoint(path)
    elif path.is_dir():
        raise UserError(f"model: {path} is neither an embedkit export ({META}) nor a run dir (checkpoints/last.ckpt)")
    else:
        raise UserError(f"model: {path} does not exist")
    encoder.cut(layer=layer, dim=dim)
    if device:
        encoder.to(device)
    return encoder.eval()


def read_meta(folder: Path) -> dict:
    meta = json.loads((folder / META).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"model: {folder / META} has format {meta.get('format')!r}; this embedkit reads {FORMAT_VERSION}")
    return meta


def from_export(folder: Path) -> Encoder:
    from safetensors.torch import load_file

    from embedkit.config import registry

    meta = read_meta(folder)
    registry.load_plugins(list(meta.get("plugins") or []))
    model = copy.deepcopy(meta["model"])
    model["backbone"].update(path=str(folder.resolve()), tiny=False)
    if meta["merged"]:
        model["lora"] = {**model["lora"], "enabled": False}
    encoder = Encoder.from_config(model, seed=meta["seed"])
    extra = {}
    if (folder / POOLING).is_file():
        extra.update({f"pooling.{k}": v for k, v in load_file(str(folder / POOLING)).items()})
    if not meta["merged"] and (folder / ADAPTER).is_file():
        extra.update({f"backbone.{k}": v for k, v in load_file(str(folder / ADAPTER)).items()})
    missing, unexpected = encoder.load_state_dict(extra, strict=False)
    own = [k for k in missing if k.startswith("pooling.") or "lora_" in k]
    if unexpected or own:
        raise UserError(f"model: {folder} does not match its {META} (missing {own[:3]}, unexpected {unexpected[:3]})")
    encoder.config = meta.get("training_config") or {}
    encoder.checkpoint_step = int(meta.get("step", 0))
    encoder.matryoshka_dims = meta.get("matryoshka_dims")
    pairs = meta.get("matryoshka_pairs")
    encoder.matryoshka_pairs = [tuple(p) for p in pairs] if pairs else None
    if meta.get("final_norm") is False:  # exported cut below its top (export_model layer=)
        skip_final_norm(encoder.backbone)
    encoder.dim = meta.get("dim")
    encoder.prompts = dict(meta.get("prompts") or {})
    return encoder.eval()
