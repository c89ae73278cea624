"""Merging runs of one base into one model: ``average``, ``slerp`` and ``ties``. Weight-space surgery on
finished runs (run dirs in, a run dir out, through ``RunDir``), beside export's LoRA merge.

Li et al., "Improving General Text Embedding Model: Tackling Task Conflict and Data Imbalance through
Model Merging" (arXiv 2410.15035) train embedding models on separate task groups and merge them
instead of training jointly; they compare against the merges below (their own Self Positioning, a
search over task-vector coefficients, is not implemented). Per tensor, with runs ``theta_1..n``,
weights ``w_i`` and the base ``theta_0`` the runs started from:

- ``average`` (model soups, Wortsman et al., arXiv 2203.05482, the uniform soup when the weights are
  equal): ``sum_i w_i theta_i / sum_i w_i``.
- ``slerp`` (two runs; spherical linear interpolation, Shoemake 1985), ``t = w_2 / (w_1 + w_2)``,
  on the flattened tensors ``a, b``: ``Omega = arccos(<a, b> / (|a| |b|))``,
  ``slerp = sin((1 - t) Omega) / sin(Omega) a + sin(t Omega) / sin(Omega) b``; plain linear
  interpolation when ``sin(Omega)`` is below ``1e-6`` (parallel tensors, e.g. frozen ones).
- ``ties`` (TIES-Merging, Yadav et al., arXiv 2306.01708, Sec. 3): task vectors ``tau_i = theta_i -
  theta_0``; trim each to its top ``density`` fraction by magnitude (the rest set to 0); elect a sign
  per entry, ``gamma = sign(sum_i tau_i)`` of the trimmed vectors; disjoint mean over the runs whose
  trimmed entry is non-zero and agrees with ``gamma``, weighted by ``w_i``; ``theta = theta_0 +
  scale * tau``.

LoRA runs are merged in weight space: each run's adapter is folded into its base weights first (the
average of two adapters' A and B matrices is not the average of their products), so the merged run
is a full model (``model.lora.enabled: false``); its ``theta_0`` for ``ties`` is the frozen base the
checkpoints carry. A fully fine-tuned run's ``theta_0`` is the model its config builds (the
``model.backbone.path`` checkpoint, or the seeded tiny model) with pooling heads initialised from
``seed``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from embedkit.config.flat import flatten
from embedkit.encoder import CHECKPOINT_PREFIX, Encoder, read_checkpoint
from embedkit.errors import UserError
from embedkit.export.reader import checkpoint_of, from_checkpoint
from embedkit.runs import RunDir
from embedkit.tracking import lineage

METHODS = ("average", "slerp", "ties")


# ---------------------------------------------------------------- the formulas, per tensor


def average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = float(sum(weights))
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights):
        out += (w / total) * t.double()
    return out.to(tensors[0].dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    x, y = a.double().flatten(), b.double().flatten()
    na, nb = x.norm(), y.norm()
    if na == 0 or nb == 0:
        return ((1 - t) * x + t * y).view_as(a).to(a.dtype)
    cos = torch.clamp((x @ y) / (na * nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    if sin < eps:
        out = (1 - t) * x + t * y
    else:
        out = (torch.sin((1 - t) * omega) / sin) * x + (torch.sin(t * omega) / sin) * y
    return out.view_as(a).to(a.dtype)


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``ceil(density * n)`` entries of largest magnitude (ties at the threshold kept)."""
    k = max(1, math.ceil(density * tau.numel()))
    if k >= tau.numel():
        return tau
    threshold = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float = 0.2,
         scale: float = 1.0) -> torch.Tensor:
    taus = torch.stack([trim(t.double() - base.double(), density) for t in tensors])  # [n, ...]
    gamma = torch.sign(taus.sum(0))
    agree = (torch.sign(taus) == gamma) & (taus != 0)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64).view(-1, *[1] * base.dim())
    num = (w * taus * agree).sum(0)
    den = (w * agree).sum(0)
    tau = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))
    return (base.double() + scale * tau).to(base.dtype)


# ---------------------------------------------------------------- runs


def check_one_base(configs: Sequence[dict], runs: Sequence[Path]) -> None:
    """Runs of one base: equal model sections (and seeds, for tiny random backbones); else one line."""
    first = flatten({"model": configs[0]["model"]})
    for cfg, run in zip(configs[1:], runs[1:]):
        other = flatten({"model": cfg["model"]})
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise UserError(f"merge: {run} differs from {runs[0]} in {key} ({other.get(key)!r} vs "
                                f"{first.get(key)!r}); merge runs of one base")
        if cfg["model"]["backbone"].get("tiny") and cfg["seed"] != configs[0]["seed"]:
            raise UserError(f"merge: {run} differs from {runs[0]} in seed ({cfg['seed']} vs {configs[0]['seed']}), "
                            "which draws a tiny backbone's weights; merge runs of one base")


def weight_space(ckpt: Path, trust: bool = False) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(config, the encoder's weights with any LoRA folded in, the frozen base under LoRA or None);
    the checkpoint read weights-only unless ``trust``."""
    from embedkit.backbones.lora import lora_layers, remove_lora

    encoder = from_checkpoint(ckpt, trust=trust)
    config = encoder.provenance.config
    if not lora_layers(encoder.backbone):
        return config, {k: v.detach().clone() for k, v in encoder.state_dict().items()}, None
    base = copy.deepcopy(encoder)
    remove_lora(base.backbone, merge=False)
    remove_lora(encoder.backbone, merge=True)
    return config, dict(encoder.state_dict()), dict(base.state_dict())


def built_base(config: dict) -> dict[str, torch.Tensor]:
    """The model a fully fine-tuned run started from: its config built again, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"])
        encoder = Encoder.from_config(config["model"], seed=config["seed"])
    return dict(encoder.state_dict())


def check_args(runs: Sequence[Path], method: str, weights: Sequence[float] | None, density: float) -> list[float]:
    """The merge's arguments, checked before anything is read; the weights (default: equal)."""
    if method not in METHODS:
        raise UserError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if len(runs) < 2:
        raise UserError("merge: give at least two runs (embedkit merge RUN_A RUN_B ... out=DIR)")
    if method == "slerp" and len(runs) != 2:
        raise UserError(f"method: slerp merges exactly two runs, got {len(runs)}")
    weights = [1.0] * len(runs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(runs):
        raise UserError(f"weights: {len(weights)} weights for {len(runs)} runs")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"weights: must be >= 0 with a positive sum, got {weights}")
    if not 0 < density <= 1:
        raise UserError(f"density: must be in (0, 1], got {density}")
    return weights


def merge_states(states: Sequence[dict], method: str, weights: Sequence[float], base: dict | None = None,
                 density: float = 0.2, scale: float = 1.0, log: Callable[[str], None] = print) -> dict:
    """Tensor by tensor; non-float tensors (integer buffers) must be equal and are kept."""
    merged = {}
    keys = list(states[0])
    for n, key in enumerate(keys):
        tensors = [s[key] for s in states]
        if not tensors[0].is_floating_point():
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise UserError(f"merge: the runs' non-float tensor {key} differs; merge runs of one base")
            merged[key] = tensors[0]
        elif method == "average":
            merged[key] = average(tensors, weights)
        elif method == "slerp":
            merged[key] = slerp(tensors[0], tensors[1], weights[1] / (weights[0] + weights[1]))
        else:
            merged[key] = ties(base[key], tensors, weights, density, scale)
        if (n + 1) % 200 == 0:
            log(f"merge: {n + 1}/{len(keys)} tensors")
    return merged


def merge_runs(runs: Sequence[str | Path], out: str | Path, *, method: str = "average",
               weights: Sequence[float] | None = None, density: float = 0.2, scale: float = 1.0,
               log: Callable[[str], None] = print, trust_checkpoint: bool = False) -> Path:
    """Merge ``runs`` (run dirs or checkpoint files) into a new run dir ``out`` (its config, its last
    checkpoint, ``merge.json``). Checkpoints are read weights-only unless ``trust_checkpoint``."""

    runs = [Path(r).expanduser() for r in runs]
    weights = check_args(runs, method, weights, density)
    out = Path(out).expanduser()
    if out.exists():
        raise UserError(f"out: {out} exists; remove it or choose another")
    ckpts = [checkpoint_of(r, what="merge") for r in runs]
    check_one_base([read_checkpoint(c, trust=trust_checkpoint)[0] for c in ckpts], runs)  # before any model is built

    states, config, base = [], None, None
    for i, ckpt in enumerate(ckpts):
        log(f"merge: reading run {i + 1}/{len(ckpts)}: {ckpt}")
        cfg, state, frozen = weight_space(ckpt, trust_checkpoint)
        config, base = config or cfg, base if base is not None else frozen
        states.append(state)
    if method == "ties" and base is None:
        log("merge: building the base the runs started from (ties)")
        base = built_base(config)
    merged = merge_states(states, method, weights, base, density, scale, log)

    write_run(RunDir(out), merged_config(config, out), merged, record_of(runs, method, weights, density, scale))
    # the inputs' lineage (each its own chain, as it stood), so a card or a later stage shows stage -> merge
    lineage.write(RunDir(out), lineage.node(out.name, out, f"merge {method}", 0,
                                            [lineage.of_source(r) for r in runs]))
    log(f"merge: wrote {out} ({method} of {len(runs)} runs, {len(merged)} tensors)")
    return out


def merged_config(config: dict, out: Path) -> dict:
    """The merged run's config: the first run's, LoRA off (folded: a full model), named for ``out``."""
    config = copy.deepcopy(config)
    if config["model"]["lora"].get("enabled"):
        config["model"]["lora"]["enabled"] = False
    config["run"] = {**config.get("run", {}), "name": out.name, "dir": str(out), "init_from": None}
    return config


def record_of(runs: Sequence[Path], method: str, weights: Sequence[float], density: float, scale: float) -> dict:
    record = {"method": method, "runs": [str(r.resolve()) for r in runs], "weights": list(weights)}
    if method == "ties":
        record.update(density=density, scale=scale)
    return record


def write_run(run: RunDir, config: dict, merged: dict, record: dict) -> None:
    """A run dir as ``embedkit fit`` leaves one (config, last checkpoint), plus ``merge.json``."""
    import yaml

    from embedkit.files import atomic_path, write_atomic

    run.checkpoints_dir.mkdir(parents=True)
    run.write_config(yaml.safe_dump(config, sort_keys=False))
    write_atomic(run.path / "merge.json", json.dumps(record, indent=2) + "\n")
    with atomic_path(run.last_checkpoint) as tmp:
        torch.save({"state_dict": {CHECKPOINT_PREFIX + k: v for k, v in merged.items()},
                    "hyper_parameters": {"config": config}, "global_step": 0, "embedkit_merge": record}, tmp)
