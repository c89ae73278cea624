"""``embedkit fit``: compose the config, build model + data, train, validate before and after."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from pathlib import Path


def run_paths(cfg: dict) -> tuple[str, Path]:
    name = cfg["run"]["name"] or f"{cfg['recipe'] or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg["run"]["dir"] or Path("runs") / name)
    return name, run_dir


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def progress_mode(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bar" if sys.stderr.isatty() and not os.environ.get("CI") else "log"


def quiet_third_party_noise() -> None:
    """Keep the console to embedkit's own lines: drop tips, deprecations and INFO chatter we can't act on."""
    import logging
    import warnings

    import mlflow  # noqa: F401  (mlflow sets its own log level on import: import first, then override)

    for name in ("mlflow", "alembic", "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*weights_only.*")


def make_strategy(t: dict, chunk_tokens: int = 0):
    """``trainer.strategy``, with ``fsdp2``: FSDP2 (``fully_shard``) data parallel over every device."""
    if t["strategy"] != "fsdp2":
        return t["strategy"]
    from embedkit.errors import UserError

    if not isinstance(t["devices"], int):
        raise UserError(f"trainer.strategy=fsdp2 needs an integer trainer.devices, got {t['devices']!r}")
    if chunk_tokens:
        # every sharded forward pass all-gathers parameters: ranks must run as many passes
        raise UserError(f"train.chunk_tokens={chunk_tokens} is refused with trainer.strategy=fsdp2 "
                        "(ranks would run different numbers of forward passes); use train.chunk_size")
    from lightning.pytorch.strategies import ModelParallelStrategy

    # one consolidated last.ckpt file (as with DDP), not a distributed-checkpoint folder
    return ModelParallelStrategy(data_parallel_size=t["devices"] * t["num_nodes"], tensor_parallel_size=1,
                                 save_distributed_checkpoint=False)


def main(args: list[str]) -> int:
    started = time.monotonic()
    from embedkit.config.loader import compose, split_args

    cfg = compose(args)
    _, overrides = split_args(args)
    name, run_dir = run_paths(cfg)
    cfg["run"]["name"], cfg["run"]["dir"] = name, str(run_dir)

    import lightning as L
    from omegaconf import OmegaConf

    from embedkit.data.datamodule import EmbeddingDataModule, resolve_shards
    from embedkit.tracking.mlflow_setup import log_run_inputs, make_logger
    from embedkit.training.callbacks import AtomicLastCheckpoint, LogProgress
    from embedkit.training.module import EmbeddingModule

    quiet_third_party_noise()
    config_path = run_dir / "config.yaml"
    write_atomic(config_path, OmegaConf.to_yaml(cfg))
    print(f"run {name}: {run_dir}", flush=True)

    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    module = EmbeddingModule(cfg)
    train_shards, val_shards = resolve_shards(cfg, log=lambda m: print(m, flush=True))
    data = EmbeddingDataModule(cfg, module.backbone.make_processor(), train_shards, val_shards)

    t, tr = cfg["trainer"], cfg["train"]
    logger = make_logger(cfg, name) if cfg["tracking"]["enabled"] else False
    mode = progress_mode(t["progress"])
    callbacks = [AtomicLastCheckpoint(run_dir / "checkpoints", every=t["val_check_interval"])]
    if mode == "log":
        callbacks.append(LogProgress(max(t["log_every_n_steps"], t["max_steps"] // 20)))
    accumulate = tr["accumulate_steps"]
    interval = t["val_check_interval"]
    validate = cfg["data"]["val"]["enabled"] and len(data.val_examples) > 0
    trainer = L.Trainer(
        max_steps=t["max_steps"], devices=t["devices"], num_nodes=t["num_nodes"], accelerator=t["accelerator"],
        strategy=make_strategy(t, cfg["train"]["chunk_tokens"]), precision=t["precision"], logger=logger, callbacks=callbacks,
        log_every_n_steps=min(t["log_every_n_steps"], t["max_steps"]), enable_progress_bar=mode == "bar",
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=None, use_distributed_sampler=False, default_root_dir=str(run_dir),
        val_check_interval=(interval if interval and validate else t["max_steps"] + 1) * accumulate,
        limit_val_batches=None if validate else 0,
    )
    if logger:
        log_run_inputs(logger, cfg, config_path, overrides)

    before = after = None
    if validate:
        trainer.validate(module, datamodule=data, verbose=False)
        before = module.val_results.get("val/p@1")
    trainer.fit(module, datamodule=data)
    if validate:
        trainer.validate(module, datamodule=data, verbose=False)
        after = module.val_results.get("val/p@1")
    if trainer.is_global_zero:
        if before is not None:
            n = module.val_results["num_queries"]
            print(f"held-out P@1 ({n} queries, each against {n} candidates): "
                  f"before {before:.3f} -> after {after:.3f}  (chance {1 / n:.3f})", flush=True)
        print(f"checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}  "
              f"({time.monotonic() - started:.0f}s wall)", flush=True)
    return 0
