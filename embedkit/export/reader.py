"""``open_model(spec)``: which model a path names, opened, with its ``Provenance``. The one resolver.

    a checkpoint file (``embedkit fit`` / ``merge``)          -> Encoder                kind ``checkpoint``
    a run dir (its newest checkpoint, through ``RunDir``)     -> Encoder                kind ``run``
    an export folder (``embedkit.json``)                      -> Encoder                kind ``export``
    a sentence-transformers folder (``modules.json``)         -> STEncoder (text only)  kind ``sentence_transformers``
    no path, a recipe's config (``model.backbone.path``)      -> Encoder                kind ``config``

Every verb that takes a model (``eval``, ``export``, ``merge``, ``mine``, ``encode``) and
``embedkit.load`` come here; ``load(path)`` is ``open_model`` for the kinds that give an ``Encoder``,
cut to a depth and moved to a device. The Matryoshka sizes a model was trained for are asked of its
training loss (``losses.trained_sizes``) here, where its training config is known.
"""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

from embedkit.backbones.base import DTYPE_NAMES, torch_dtype
from embedkit.encoder import Encoder, Provenance, read_checkpoint, skip_final_norm
from embedkit.errors import UserError
from embedkit.export import FORMAT_VERSION, META
from embedkit.runs import RunDir

ADAPTER = "embedkit_adapter.safetensors"  # backbone-relative LoRA tensor names (not PEFT's)
POOLING = "pooling.safetensors"
ST_MODULES = "modules.json"  # what makes a folder a sentence-transformers model

KINDS = ("checkpoint", "run", "export", "sentence_transformers", "config")
ENCODER_KINDS = ("checkpoint", "run", "export")


def load(path: str | Path, device: str | None = None, layer: int | None = None, dim: int | None = None,
         trust_checkpoint: bool = False, dtype: str | None = None) -> Encoder:
    """An ``Encoder`` in eval mode, from an export folder, a run dir or a checkpoint file; ``layer``,
    ``dim``: cut to that depth and embedding size (``Encoder.cut``; the layers above are dropped), so
    ``encode`` gives what the full model's ``encode(layer=layer, dim=dim)`` gives. A checkpoint is read
    weights-only (``encoder.load_checkpoint_file``) unless ``trust_checkpoint`` (a file you trust).
    ``dtype`` (``float32``, ``bfloat16``, ``float16``; None: as stored): the weights cast to it, so
    ``encode`` runs the model in it (embeddings still come back float32)."""
    encoder, _ = open_model(path, kinds=ENCODER_KINDS, trust_checkpoint=trust_checkpoint)
    encoder.cut(layer=layer, dim=dim)
    if dtype:
        try:
            encoder.to(torch_dtype(dtype))
        except KeyError:
            raise UserError(f"dtype: expected one of {', '.join(DTYPE_NAMES)}, got {dtype!r}") from None
    if device:
        encoder.to(device)
    return encoder.eval()


def open_model(spec: str | Path | None, *, recipe: dict | None = None, what: str = "model",
               kinds: tuple[str, ...] = KINDS, trust_checkpoint: bool = False):
    """(the model in eval mode, its ``Provenance``) of ``spec``: a checkpoint file, a run dir, an
    export folder or a sentence-transformers folder; or, with ``spec=None``, the ``model`` section
    of the resolved config ``recipe`` as it builds (its ``model.backbone.path`` names the weights).
    ``what`` names the option in the one-line errors; ``kinds``: the sources accepted;
    ``trust_checkpoint``: read a checkpoint with the full unpickler (``encoder.load_checkpoint_file``)."""
    if spec is None:
        if recipe is None or "config" not in kinds:
            raise UserError(f"{what}: give {' or '.join(DESCRIBED[k] for k in kinds)}")
        model = from_recipe(recipe)
        return model, model.provenance
    path = Path(spec).expanduser()
    kind = kind_of(path, what, file_only=kinds == ("checkpoint",))
    if kind not in kinds:
        raise UserError(f"{what}: {path} is {DESCRIBED[kind]}; give {' or '.join(DESCRIBED[k] for k in kinds)}")
    if kind == "checkpoint":
        model = from_checkpoint(path, trust=trust_checkpoint)
    elif kind == "run":
        model = from_checkpoint(RunDir(path).checkpoint(what), kind="run", source=path, trust=trust_checkpoint)
    elif kind == "export":
        model = from_export(path)
    else:
        from embedkit.export.st_encoder import STEncoder

        model = STEncoder(path)
    return model.eval(), model.provenance


DESCRIBED = {"checkpoint": "a checkpoint file", "run": "a run dir", "export": f"an embedkit export ({META})",
             "sentence_transformers": f"a sentence-transformers folder ({ST_MODULES})",
             "config": "a recipe's model (model.backbone.path)"}


def kind_of(path: Path, what: str = "model", file_only: bool = False) -> str:
    """Which kind of model source ``path`` is (``KINDS``), or a one-line ``UserError``."""
    if path.is_file():
        return "checkpoint"
    if not path.exists():
        raise UserError(f"{what}: file not found: {path}" if file_only else f"{what}: {path} does not exist")
    if (path / META).is_file():
        return "export"
    run = RunDir(path)
    if run.is_run() or run.has_checkpoint():
        return "run"
    if (path / ST_MODULES).is_file():
        return "sentence_transformers"
    raise UserError(f"{what}: {path} holds no model: it is neither an embedkit export ({META}), a run dir with "
                    f"a checkpoint, nor a sentence-transformers folder ({ST_MODULES})")


def checkpoint_of(spec: str | Path, what: str = "model") -> Path:
    """The checkpoint file ``spec`` names: itself, or a run dir's newest; else a one-line ``UserError``
    (``merge`` reads the configs of its runs from these before it builds any model)."""
    path = Path(spec).expanduser()
    kind = kind_of(path, what)
    if kind == "checkpoint":
        return path
    if kind == "run":
        return RunDir(path).checkpoint(what)
    raise UserError(f"{what}: {path} is {DESCRIBED[kind]}; give a run dir or a checkpoint file")


def trained_sizes_of(config: dict):
    """``(L, D) -> (dims, pairs)``: the Matryoshka sizes the training loss of ``config`` trained."""
    from embedkit.losses.trained_sizes import trained_sizes

    return partial(trained_sizes, config.get("loss"))


def from_checkpoint(ckpt: Path, kind: str = "checkpoint", source: Path | None = None, trust: bool = False) -> Encoder:
    """The encoder of a checkpoint written by ``embedkit fit`` or ``merge`` (its config travels inside it);
    read weights-only unless ``trust``."""
    config, state = read_checkpoint(ckpt, trust=trust)
    provenance = Provenance(kind=kind, source=Path(source or ckpt), checkpoint=Path(ckpt), config=config,
                            step=int(state.get("global_step", 0)))
    encoder = Encoder.from_config(config["model"], seed=config["seed"], provenance=provenance,
                                  trained_sizes=trained_sizes_of(config))
    return encoder.load_checkpoint_state(state).eval()


def from_recipe(config: dict) -> Encoder:
    """The recipe's model as it builds: ``model.backbone.path`` names released weights. Nothing is
    known about how they were trained (the recipe's loss is how to train them further)."""
    model = config["model"]
    source = model["backbone"].get("path")
    provenance = Provenance(kind="config", source=Path(source) if source else None)
    return Encoder.from_config(model, seed=config["seed"], provenance=provenance).eval()


def read_meta(folder: Path) -> dict:
    meta = json.loads((folder / META).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"model: {folder / META} has format {meta.get('format')!r}; this embedkit reads {FORMAT_VERSION}")
    return meta


def export_provenance(folder: Path, meta: dict) -> Provenance:
    """The export's provenance; its recorded ``inputs`` (frame policy, image cap) are the config's
    ``data.video`` / ``data.max_image_pixels`` (what ``Encoder.decoding`` reads)."""
    pairs = meta.get("matryoshka_pairs")
    config = dict(meta.get("training_config") or {})
    inputs = meta.get("inputs")
    if inputs:  # an export before inputs were recorded decodes with its training config's (or the defaults)
        config["data"] = {**(config.get("data") or {}), "video": inputs["video"],
                          "max_image_pixels": inputs.get("max_image_pixels")}
    return Provenance(kind="export", source=folder, config=config,
                      step=int(meta.get("step", 0)), dims=meta.get("matryoshka_dims"),
                      pairs=[tuple(p) for p in pairs] if pairs else None, prompts=dict(meta.get("prompts") or {}))


def from_export(folder: Path) -> Encoder:
    from safetensors.torch import load_file

    from embedkit.config import registry

    meta = read_meta(folder)
    registry.load_plugins(list(meta.get("plugins") or []))
    model = copy.deepcopy(meta["model"])
    model["backbone"].update(path=str(folder.resolve()), tiny=False)
    if meta["merged"]:
        model["lora"] = {**model["lora"], "enabled": False}
    encoder = Encoder.from_config(model, seed=meta["seed"], provenance=export_provenance(folder, meta))
    extra = {}
    if (folder / POOLING).is_file():
        extra.update({f"pooling.{k}": v for k, v in load_file(str(folder / POOLING)).items()})
    if not meta["merged"] and (folder / ADAPTER).is_file():
        extra.update({f"backbone.{k}": v for k, v in load_file(str(folder / ADAPTER)).items()})
    missing, unexpected = encoder.load_state_dict(extra, strict=False)
    own = [k for k in missing if k.startswith("pooling.") or "lora_" in k]
    if unexpected or own:
        raise UserError(f"model: {folder} does not match its {META} (missing {own[:3]}, unexpected {unexpected[:3]})")
    if meta.get("final_norm") is False:  # exported cut below its top (export_model layer=)
        skip_final_norm(encoder.backbone)
    encoder.dim = meta.get("dim")
    return encoder.eval()
