"""``embedkit eval``: MMEB evaluation of a checkpoint.

    embedkit eval [recipe=NAME] ckpt=PATH data.eval.root=DIR [data.eval.datasets=[A,B]] [out=DIR]

The model (architecture and weights) comes from the checkpoint, which carries its resolved config;
the command line supplies the eval settings: ``data.eval.*``, ``train.chunk_size`` (items per
forward pass), ``tracking.*``. Outputs go to ``out=`` (default ``<run dir>/eval/``, next to the
checkpoints folder): ``<Dataset>_score.json``, ``summary.json``, ``summary.md``, each written
atomically. Metrics (``eval/<Dataset>/p@1``, ``eval/<MetaTask>/p@1``, ``eval/IND/p@1``,
``eval/OOD/p@1``, ``eval/overall/p@1``; ``@`` stored as ``_at_``) and the summary files go to the
MLflow run that trained the checkpoint (found by its run name in its experiment), or else to a new
run named ``eval-<run name>`` tagged with the checkpoint path.

Under ``torchrun`` (WORLD_SIZE > 1) every process encodes a share of the distinct items; the result
is the one a single process gives.
"""

from __future__ import annotations

import os
from pathlib import Path

from embedkit.errors import UserError

VERB_KEYS = ("ckpt", "out")


def split_verb_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    verb: dict[str, str] = {}
    rest = []
    for arg in args:
        key = arg.split("=", 1)[0]
        if key in VERB_KEYS and "=" in arg:
            verb[key] = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return verb, rest


def metric_items(summary: dict) -> dict[str, float]:
    """Display names (``eval/<name>/p@1``) of everything the summary holds."""
    out = {f"eval/{name}/p@1": r["acc"] for name, r in summary["datasets"].items()}
    agg = summary["aggregate"]
    out.update({f"eval/{task}/p@1": v for task, v in agg["meta_task"].items()})
    for group in ("IND", "OOD", "overall"):
        if agg[group] is not None:
            out[f"eval/{group}/p@1"] = agg[group]
    for name, r in summary["datasets"].items():
        for k in ("recall@5", "recall@10", "mrr"):
            if k in r["details"]:
                out[f"eval/{name}/{k}"] = r["details"][k]
    return out


def load_module(ckpt: Path):
    """The EmbeddingModule of a checkpoint, built from the config it carries (plugins loaded first)."""
    import torch

    from embedkit.config import registry
    from embedkit.training.module import EmbeddingModule

    state = torch.load(str(ckpt), map_location="cpu", weights_only=False, mmap=True)
    try:
        config = state["hyper_parameters"]["config"]
    except (KeyError, TypeError):
        raise UserError(f"ckpt: {ckpt} is not an embedkit checkpoint (no hyper_parameters.config)") from None
    registry.load_plugins(list(config.get("plugins") or []))
    module = EmbeddingModule(config)
    module.load_state_dict(state["state_dict"], strict=True)
    module.checkpoint_step = int(state.get("global_step", 0))  # eval metrics are logged at this step
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    return module.to(device).eval()


def make_encoder(module):
    import torch

    processor = module.backbone.make_processor()

    def encode(items):
        inputs = processor(items)
        inputs = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.no_grad():
            return module.encode(inputs)

    return encode


def find_training_run(client, experiment: str, run_name: str | None, run_dir: str | None = None):
    """The latest run of ``experiment`` named ``run_name`` (and with param ``run.dir``, if given)."""
    if not run_name or "'" in run_name or (run_dir and "'" in run_dir):
        return None
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`mlflow.runName` = '{run_name}'"
    if run_dir:
        query += f" and params.`run.dir` = '{run_dir}'"
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=query,
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def log_to_mlflow(cfg: dict, ckpt_cfg: dict, ckpt: Path, summary: dict, out_dir: Path, step: int = 0) -> str:
    """Log metrics and files to the training run (or a new eval run); returns the run id."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from embedkit.tracking.mlflow_setup import tracking_uri
    from embedkit.tracking.store import stored_name

    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    experiment = ckpt_cfg.get("tracking", {}).get("experiment") or cfg["tracking"]["experiment"]
    run = find_training_run(client, experiment, ckpt_cfg.get("run", {}).get("name"), ckpt_cfg.get("run", {}).get("dir"))
    if run is not None:
        run_id = run.info.run_id
    else:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        name = f"eval-{ckpt_cfg.get('run', {}).get('name') or ckpt.stem}"
        run_id = client.create_run(exp_id, run_name=name, tags={"embedkit.kind": "eval"}).info.run_id
    client.set_tag(run_id, "embedkit.eval.ckpt", str(ckpt.resolve()))
    client.set_tag(run_id, "embedkit.eval.root", str(cfg["data"]["eval"]["root"]))
    now = int(time.time() * 1000)
    metrics = [Metric(stored_name(k), float(v), now, step) for k, v in metric_items(summary).items()]
    client.log_batch(run_id, metrics=metrics)
    for name in ("summary.json", "summary.md"):
        client.log_artifact(run_id, str(out_dir / name), artifact_path="eval")
    if run is None:
        client.set_terminated(run_id)
    return run_id


def main(args: list[str]) -> int:
    from embedkit.config.loader import compose

    verb, rest = split_verb_args(args)
    if "ckpt" not in verb:
        raise UserError("eval: give ckpt=PATH (a checkpoint written by embedkit fit)")
    cfg = compose(rest)
    from embedkit.eval import mmeb

    manifest = mmeb.load_manifest()
    ev = cfg["data"]["eval"]
    datasets = mmeb.resolve_datasets(ev["root"], ev["datasets"], manifest)  # user errors before loading
    ckpt = Path(verb["ckpt"]).expanduser()
    if not ckpt.is_file():
        raise UserError(f"ckpt: file not found: {ckpt}")
    out_dir = Path(verb["out"]) if "out" in verb else ckpt.resolve().parent.parent / "eval"

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    log = print if rank == 0 else None

    module = load_module(ckpt)
    ckpt_cfg = module.hparams["config"]
    summary = mmeb.evaluate(
        ev["root"],
        datasets,
        make_encoder(module),
        batch_size=cfg["train"]["chunk_size"],
        normalize=ckpt_cfg["model"]["normalize"],
        out_dir=out_dir,
        manifest=manifest,
        log=lambda m: print(m, flush=True) if log else None,
    )
    if rank == 0:
        agg = summary["aggregate"]
        print(mmeb.markdown_table(summary, manifest), end="")
        print(f"overall P@1 {agg['overall']:.4f} over {len(summary['datasets'])} datasets; files in {out_dir}")
        if cfg["tracking"]["enabled"]:
            run_id = log_to_mlflow(cfg, ckpt_cfg, ckpt, summary, out_dir, module.checkpoint_step)
            print(f"logged to MLflow run {run_id}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
