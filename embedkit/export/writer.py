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

from embedkit.encoder import Encoder, drop_layers
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


def export_model(source, out, *, merge_lora: bool = True, dtype: str | None = None,
                 prompts: dict[str, str] | None = None, overwrite: bool = False,
                 layer: int | None = None, dim: int | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """``layer``, ``dim``: export the model cut to that depth and embedding size (``Encoder.cut``): the
    layers above ``layer`` are not written, and ``embedkit.json`` records the cut so ``embedkit.load``
    gives ``encode(layer=layer, dim=dim)``'s embeddings. Below the top the cut model skips the final
    norm, which transformers readers would apply: no sentence-transformers files are written then."""
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
    encoder.check_depth(layer, dim)
    depth, full_dim = encoder.backbone.num_layers, encoder.embedding_dim
    cut_depth = layer is not None and layer < depth
    dim = dim if dim is not None and dim < full_dim else None
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        backbone = encoder.backbone
        if cut_depth:  # before LoRA is read: the adapter of a dropped layer is not written either
            log(f"export: keeping the first {layer} of {depth} layers")
            drop_layers(backbone, layer)
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
            "embedding_dim": full_dim,
            "matryoshka_dims": encoder.matryoshka_dims,
            "matryoshka_pairs": encoder.matryoshka_pairs,
            # the cut (Encoder.cut): the model's depth as trained, the depth kept, whether the
            # language model's final norm applies (only at full depth), the embedding size kept
            "num_layers": depth,
            "layer": layer if cut_depth else None,
            "final_norm": not cut_depth,
            "dim": dim,
            "prompts": dict(prompts or {}),
            "plugins": list(config.get("plugins") or []),
            "step": encoder.checkpoint_step,
            "checkpoint": str(ckpt.resolve()),
            "training_config": config,
        }
        meta.update(run_record.find(config, ckpt))  # the MLflow run id and metrics, or why there are none
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))
        if cut_depth:
            log(f"export: no sentence-transformers files (layer={layer} < {depth}: the cut model skips the "
                "final norm, which transformers readers apply); embedkit.load reads it")
        else:
            log("export: writing sentence-transformers files")
            st_files.write(tmp, meta, encoder)
        log("export: writing the model card")
        (tmp / "README.md").write_text(card.render(meta, ckpt))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: wrote {out}")
    return out
