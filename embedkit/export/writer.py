"""``export_model``: a run dir or checkpoint -> a self-contained folder (see ``embedkit/export``).

Written under a temporary name beside ``out`` and renamed when complete, so a folder at ``out`` is
always a whole export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from embedkit.encoder import Encoder
from embedkit.errors import UserError
from embedkit.export import FORMAT_VERSION, META, card, run_record, st_files
from embedkit.export.reader import ADAPTER, POOLING

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_of(source: str | Path) -> Path:
    source = Path(source).expanduser()
    if source.is_dir():
        ckpt = source / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise UserError(f"export: {source} is not a run dir (no checkpoints/last.ckpt)")
        return ckpt
    if not source.is_file():
        raise UserError(f"export: {source} does not exist")
    return source


def matryoshka_dims(config: dict, dim: int) -> list[int] | None:
    """The nesting dims of a Matryoshka-trained model (``loss.name=matryoshka``), else None."""
    loss = config.get("loss") or {}
    if loss.get("name") != "matryoshka":
        return None
    from embedkit.losses.matryoshka import default_dims

    return sorted({int(d) for d in (loss.get("dims") or default_dims(dim))}, reverse=True)


def export_model(source, out, *, merge_lora: bool = True, dtype: str | None = None,
                 prompts: dict[str, str] | None = None, overwrite: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    from embedkit.backbones.lora import lora_is_zero, lora_layers, lora_state_dict, remove_lora

    ckpt = checkpoint_of(source)
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"out: {out} exists; remove it or pass overwrite=true")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    log(f"export: reading {ckpt}")
    encoder = Encoder.from_checkpoint(ckpt)
    config = encoder.config
    model = json.loads(json.dumps(config["model"]))
    lora_on = bool(lora_layers(encoder.backbone))
    if lora_on and lora_is_zero(encoder.backbone):
        raise UserError(f"export: the LoRA adapter in {ckpt} is still zero (every lora_B is 0): the run trained nothing")
    dims = matryoshka_dims(config, encoder.embedding_dim)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        backbone = encoder.backbone
        adapter = {}
        if lora_on:
            log(f"export: {'merging' if merge_lora else 'separating'} LoRA in {len(lora_layers(backbone))} layers")
            if not merge_lora:
                adapter = lora_state_dict(backbone)
            remove_lora(backbone, merge=merge_lora)
        if dtype is not None:
            backbone.to(DTYPES[dtype])
            model["backbone"]["dtype"] = dtype
        model["backbone"]["path"], model["backbone"]["tiny"] = None, False
        log(f"export: writing the backbone ({sum(p.numel() for p in backbone.parameters()):,} parameters)")
        st_files.prepare_tokenizer(backbone, model["backbone"]["name"])
        backbone.save_pretrained(str(tmp))
        st_files.bake_eos(tmp, backbone, model["backbone"]["name"])
        from safetensors.torch import save_file

        if adapter:
            save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp / ADAPTER))
        head = {k: v.detach().contiguous() for k, v in encoder.pooling.state_dict().items()}
        if head:
            save_file(head, str(tmp / POOLING))
        meta = {
            "format": FORMAT_VERSION,
            "model": model,
            "seed": config["seed"],
            "merged": merge_lora or not lora_on,
            "normalize": encoder.normalize,
            "embedding_dim": encoder.embedding_dim,
            "matryoshka_dims": dims,
            "prompts": dict(prompts or {}),
            "plugins": list(config.get("plugins") or []),
            "step": encoder.checkpoint_step,
            "checkpoint": str(ckpt.resolve()),
            "training_config": config,
        }
        meta.update(run_record.find(config, ckpt))  # the MLflow run id and metrics, or why there are none
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        log("export: writing sentence-transformers files and the model card")
        st_files.write(tmp, meta, encoder)
        (tmp / "README.md").write_text(card.render(meta, ckpt))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: wrote {out}")
    return out
