"""``export_model``: a run dir or checkpoint -> a self-contained folder (see ``embedkit/export``).

Written under a temporary name beside ``out`` and renamed when complete, so a folder at ``out`` is
always a whole export. The steps, each a function below: open the model (``reader.open_model``),
cut it to a depth, fold or separate LoRA, cast, write the backbone and head, ``embedkit.json``, the
sentence-transformers files and the model card.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from embedkit.encoder import Encoder, drop_layers
from embedkit.errors import UserError
from embedkit.export import FORMAT_VERSION, META, card, st_files
from embedkit.export.reader import ADAPTER, POOLING, open_model
from embedkit.runs import RunDir


@dataclass
class Cut:
    """The export's cut (``Encoder.cut``): the depth as trained, the layer kept (None: all), the dim
    kept (None: all)."""

    depth: int
    layer: int | None
    dim: int | None


def export_model(source, out, *, merge_lora: bool = True, dtype: str | None = None,
                 prompts: dict[str, str] | None = None, overwrite: bool = False,
                 layer: int | None = None, dim: int | None = None,
                 log: Callable[[str], None] = print, trust_checkpoint: bool = False) -> Path:
    """``trust_checkpoint``: read the checkpoint with the full unpickler (``encoder.load_checkpoint_file``).
    ``layer``, ``dim``: export the model cut to that depth and embedding size (``Encoder.cut``): the
    layers above ``layer`` are not written, and ``embedkit.json`` records the cut so ``embedkit.load``
    gives ``encode(layer=layer, dim=dim)``'s embeddings. Below the top the cut model skips the final
    norm, which transformers readers would apply: no sentence-transformers files are written then."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise UserError(f"out: {out} exists; remove it or pass overwrite=true")
    dtype_of(dtype)
    encoder, provenance = open_model(source, what="export", kinds=("checkpoint", "run"),
                                     trust_checkpoint=trust_checkpoint)
    log(f"export: read {provenance.checkpoint}")
    lora_on = check_lora(encoder)
    cut = plan_cut(encoder, layer, dim)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model = write_weights(tmp, encoder, cut, lora_on=lora_on, merge_lora=merge_lora, dtype=dtype, log=log)
        meta = metadata(encoder, model, cut, merged=merge_lora or not lora_on, prompts=prompts)
        write_folder(tmp, meta, encoder, cut, log)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: wrote {out}")
    return out


def dtype_of(name: str | None):
    """The torch dtype of ``name`` (None: keep the model's), or a one-line ``UserError``."""
    from embedkit.backbones.base import DTYPE_NAMES, torch_dtype

    if name is None:
        return None
    try:
        return torch_dtype(name)
    except KeyError:
        raise UserError(f"dtype: {name!r} is not one of {', '.join(DTYPE_NAMES)}") from None


def check_lora(encoder: Encoder) -> bool:
    """Whether the model has LoRA layers; a one-line error when its adapter is still zero."""
    from embedkit.backbones.lora import lora_is_zero, lora_layers

    lora_on = bool(lora_layers(encoder.backbone))
    if lora_on and lora_is_zero(encoder.backbone):
        raise UserError(f"export: the LoRA adapter in {encoder.provenance.checkpoint} is still zero (every lora_B "
                        "is 0): the run trained nothing")
    return lora_on


def plan_cut(encoder: Encoder, layer: int | None, dim: int | None) -> Cut:
    """The cut asked (checked against what the model can be cut to); the full size means no cut."""
    encoder.check_depth(layer, dim)
    depth = encoder.backbone.num_layers
    return Cut(depth, layer if layer is not None and layer < depth else None,
               dim if dim is not None and dim < encoder.embedding_dim else None)


def write_weights(folder: Path, encoder: Encoder, cut: Cut, *, lora_on: bool, merge_lora: bool,
                  dtype: str | None, log: Callable[[str], None]) -> dict:
    """Cut, fold or separate LoRA, cast; write the backbone (with tokenizer files), the adapter and the
    head's weights. The exported ``model`` section (no weights path: the folder is the weights)."""
    from safetensors.torch import save_file

    from embedkit.backbones.lora import lora_layers, lora_state_dict, remove_lora

    model = json.loads(json.dumps(encoder.provenance.config["model"]))
    backbone = encoder.backbone
    if cut.layer is not None:  # before LoRA is read: the adapter of a dropped layer is not written either
        log(f"export: keeping the first {cut.layer} of {cut.depth} layers")
        drop_layers(backbone, cut.layer)
    adapter = {}
    if lora_on:
        log(f"export: {'merging' if merge_lora else 'separating'} LoRA in {len(lora_layers(backbone))} layers")
        if not merge_lora:
            adapter = lora_state_dict(backbone)
        remove_lora(backbone, merge=merge_lora)
    if dtype is not None:
        backbone.to(dtype_of(dtype))
        model["backbone"]["dtype"] = dtype
    model["backbone"]["path"], model["backbone"]["tiny"] = None, False
    log(f"export: writing the backbone ({sum(p.numel() for p in backbone.parameters()):,} parameters)")
    st_files.prepare_tokenizer(backbone, model["backbone"]["name"])
    backbone.save_pretrained(str(folder))
    st_files.bake_eos(folder, backbone, model["backbone"]["name"])
    if adapter:
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(folder / ADAPTER))
    head = {k: v.detach().contiguous() for k, v in encoder.pooling.state_dict().items()}
    if head:
        save_file(head, str(folder / POOLING))
    return model


def metadata(encoder: Encoder, model: dict, cut: Cut, *, merged: bool, prompts: dict[str, str] | None) -> dict:
    """``embedkit.json``: what ``embedkit.load`` needs, the provenance, and the MLflow record of the
    training run (``"mlflow": {experiment, run_id, store}`` or ``{experiment, note}``; ``metrics``)."""
    from embedkit.tracking import lineage
    from embedkit.tracking.training_run import training_run_record

    provenance = encoder.provenance
    config, ckpt = provenance.config, Path(provenance.checkpoint)
    meta = {
        "format": FORMAT_VERSION,
        "model": model,
        "seed": config["seed"],
        "merged": merged,
        "normalize": encoder.normalize,
        "embedding_dim": encoder.embedding_dim,
        "matryoshka_dims": provenance.dims,
        "matryoshka_pairs": provenance.pairs,
        # the cut (Encoder.cut): the model's depth as trained, the depth kept, whether the
        # language model's final norm applies (only at full depth), the embedding size kept
        "num_layers": cut.depth,
        "layer": cut.layer,
        "final_norm": cut.layer is None,
        "dim": cut.dim,
        "prompts": dict(prompts or {}),
        "inputs": inputs_record(encoder),
        "plugins": list(config.get("plugins") or []),
        "step": provenance.step,
        "checkpoint": str(ckpt.resolve()),
        "training_config": config,
    }
    meta.update(training_run_record(config, RunDir.of_checkpoint(ckpt)))  # the MLflow run, or why there is none
    meta["lineage"] = lineage.of_source(ckpt, provenance.step)  # where the weights came from (the card's line)
    return meta


#: how an item's text places its visuals (``data.schema.segments``); recorded so a user of the export writes it
PROMPT_FORMAT = ("<|image_1|> ... <|image_k|> mark where each image goes and <|video_1|> the video; text "
                 "without them has the visuals before it, in order")


def inputs_record(encoder: Encoder) -> dict:
    """``embedkit.json``'s ``inputs``: the frame policy videos are sampled by (``data.video``), the image
    pixel cap (``data.max_image_pixels``) and the prompt format; ``embedkit.load`` decodes with these."""
    from dataclasses import asdict

    decoding = encoder.decoding
    return {"video": asdict(decoding.policy), "max_image_pixels": decoding.max_image_pixels,
            "prompt_format": PROMPT_FORMAT}


def write_folder(folder: Path, meta: dict, encoder: Encoder, cut: Cut, log: Callable[[str], None]) -> None:
    """``embedkit.json``, the sentence-transformers files (not for a model cut below its top), the card."""
    why_not = st_files.unsupported(meta["model"])
    if why_not:
        meta["no_sentence_transformers"] = why_not
    (folder / META).write_text(json.dumps(meta, indent=2, default=str))
    if cut.layer is not None:
        log(f"export: no sentence-transformers files (layer={cut.layer} < {cut.depth}: the cut model skips the "
            "final norm, which transformers readers apply); embedkit.load reads it")
    elif why_not:
        log(f"export: no sentence-transformers files ({why_not}); embedkit.load reads it")
    else:
        log("export: writing sentence-transformers files")
        st_files.write(folder, meta, encoder)
    log("export: writing the model card")
    (folder / "README.md").write_text(card.render(meta))
