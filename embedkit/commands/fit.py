"""``embedkit fit``: compose the config, build model + data, train, validate before and after.

The config is read here once; each builder gets its section or the values it needs (the module
its ``model``/``loss``/``train`` sections, the datamodule its ``data`` section and the batch words,
the logger its ``tracking`` section).
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path


def run_paths(cfg: dict) -> tuple[str, Path]:
    name = cfg["run"]["name"] or f"{cfg['recipe'] or 'run'}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg["run"]["dir"] or Path("runs") / name)
    return name, run_dir


def quiet_third_party_noise(tracking: bool) -> None:
    """Keep the console to embedkit's own lines: drop tips, deprecations and INFO chatter we can't act on."""
    import logging
    import warnings

    if tracking:
        import mlflow  # noqa: F401  (mlflow sets its own log level on import: import first, then override)

    for name in ("mlflow", "alembic", "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*weights_only.*")


def make_strategy(trainer: dict):
    """``trainer.strategy``, with ``fsdp2``: FSDP2 (``fully_shard``) data parallel over every device.

    The schema has already checked the combinations (integer devices, no token budget).
    """
    if trainer["strategy"] != "fsdp2":
        return trainer["strategy"]
    from lightning.pytorch.strategies import ModelParallelStrategy

    # one consolidated last.ckpt file (as with DDP), not a distributed-checkpoint folder
    return ModelParallelStrategy(data_parallel_size=trainer["devices"] * trainer["num_nodes"], tensor_parallel_size=1,
                                 save_distributed_checkpoint=False)


def main(args: list[str]) -> int:
    started = time.monotonic()
    from embedkit.config.loader import compose, split_args, to_yaml

    cfg = compose(args)
    _, overrides = split_args(args)
    name, run_dir = run_paths(cfg)
    cfg["run"]["name"], cfg["run"]["dir"] = name, str(run_dir)

    import lightning as L

    from embedkit.console import progress_mode
    from embedkit.data.datamodule import EmbeddingDataModule, resolve_shards
    from embedkit.files import write_atomic
    from embedkit.training.callbacks import AtomicLastCheckpoint, LogProgress
    from embedkit.training.module import EmbeddingModule

    tracking, train, trainer_cfg, ev = cfg["tracking"], cfg["train"], cfg["trainer"], cfg["data"]["eval"]
    quiet_third_party_noise(tracking["enabled"])
    config_path = run_dir / "config.yaml"
    write_atomic(config_path, to_yaml(cfg))
    print(f"run {name}: {run_dir}", flush=True)

    from embedkit.training.optim import total_steps

    seed = cfg["seed"]
    train_shards, val_shards = resolve_shards(cfg["data"], log=lambda m: print(m, flush=True))
    L.seed_everything(seed, workers=True, verbose=False)
    module = EmbeddingModule.build(cfg["model"], cfg["loss"], train, seed=seed, max_steps=trainer_cfg["max_steps"],
                                   config=cfg)
    # trainer.max_epochs > 0: the run length in optimizer steps, from the training examples' count
    max_steps = module.max_steps = total_steps(module.max_steps, trainer_cfg["max_epochs"], train_shards,
                                               train["global_batch_size"] * module.accumulate)
    if trainer_cfg["max_epochs"]:
        print(f"trainer.max_epochs={trainer_cfg['max_epochs']}: {max_steps} optimizer steps", flush=True)
    chunk_size = train["chunk_size"]
    data = EmbeddingDataModule(cfg["data"], module.encoder.processor(), train_shards, val_shards, seed=seed,
                               global_batch_size=train["global_batch_size"], chunk_size=chunk_size,
                               chunk_tokens=train["chunk_tokens"])

    logger = False
    if tracking["enabled"]:
        from embedkit.tracking.mlflow_setup import make_logger

        logger = make_logger(tracking, cfg["recipe"], name)
    interval = trainer_cfg["val_check_interval"]
    mode = progress_mode(trainer_cfg["progress"])
    callbacks = [AtomicLastCheckpoint(run_dir / "checkpoints", every=interval)]
    if mode == "log":
        callbacks.append(LogProgress(max(trainer_cfg["log_every_n_steps"], max_steps // 20)))
    validate = len(data.val_examples) > 0
    if validate and ev["root"] and ev["val_rows"] > 0:
        from embedkit.eval.callback import MMEBValidation

        callbacks.append(MMEBValidation(ev["root"], ev["datasets"], max_rows=ev["val_rows"], batch_size=chunk_size))
    trainer = L.Trainer(
        max_steps=max_steps, devices=trainer_cfg["devices"], num_nodes=trainer_cfg["num_nodes"],
        accelerator=trainer_cfg["accelerator"], strategy=make_strategy(trainer_cfg),
        precision=trainer_cfg["precision"], logger=logger, callbacks=callbacks,
        log_every_n_steps=min(trainer_cfg["log_every_n_steps"], max_steps), enable_progress_bar=mode == "bar",
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=None, use_distributed_sampler=False, default_root_dir=str(run_dir),
        val_check_interval=(interval if interval and validate else max_steps + 1) * module.accumulate,
        limit_val_batches=None if validate else 0,
    )
    if logger:
        from embedkit.tracking.mlflow_setup import log_run_inputs

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
