"""``embedkit fit``: compose the config, build model + data, train, validate before and after.

The config is read here once; each builder gets its section or the values it needs (the module
its ``model``/``loss``/``train`` sections, the datamodule its ``data`` section and the batch words,
the logger its ``tracking`` section).
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

from embedkit.commands._options import Verb

#: the command line (``embedkit fit --help``): config words, and ``resume=`` (read by ``compose_run``)
VERB = Verb("fit", "train (no recipe: the demo, a tiny VLM on drawn scenes, CPU, minutes)", config=("",),
            words=(("resume=RUN_DIR", "continue that run from its newest checkpoint; a resume may change only "
                                      "trainer.max_steps, the logging and checkpoint cadence and tracking.tags"),))

#: the run name the launching process chose, for the ranks Lightning's DDP launcher starts later by
#: re-running the command line (a default name drawn from the clock again would be another run dir)
RUN_NAME_ENV = "EMBEDKIT_RUN_NAME"


def run_paths(cfg: dict) -> tuple[str, Path]:
    name = (cfg["run"]["name"] or os.environ.get(RUN_NAME_ENV)
            or f"{cfg['recipe'] or 'run'}-{datetime.now():%Y%m%d-%H%M%S}")
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


#: keys a resume may change: they leave the training math as it was (``tracking.tags.*`` too).
#: ``trainer.max_steps`` extends (or shortens) the run; the cosine schedule is rebuilt for the new length.
RESUMABLE = ("trainer.max_steps", "trainer.progress", "trainer.val_check_interval", "trainer.log_every_n_steps",
             "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.stop_signal", "train.max_skipped_steps",
             "tracking.tags", "run.resume")
#: exit status when the non-finite guard stops a run (signals: 128 + the signal number, e.g. 143, 130)
EXIT_DIVERGED = 3


def _flat(cfg, prefix: str = "") -> dict:
    if isinstance(cfg, dict) and cfg:
        out: dict = {}
        for k, v in cfg.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: cfg}


def resumed_config(saved: dict, new: dict, where: str) -> dict:
    """The saved config with the changes a resume may make taken from ``new``; ConfigError naming the
    first other key that differs (``run.name``/``run.dir`` keep the saved values)."""
    import copy

    from embedkit.errors import ConfigError

    old_flat, new_flat = _flat(saved), _flat(new)
    out = copy.deepcopy(saved)
    for key in sorted(set(old_flat) | set(new_flat)):
        if old_flat.get(key) == new_flat.get(key) or key in ("run.name", "run.dir"):
            continue
        if not any(key == k or key.startswith(k + ".") for k in RESUMABLE):
            raise ConfigError(f"{key}: cannot change on resume ({old_flat.get(key)!r} in {where}, now "
                              f"{new_flat.get(key)!r}); a resume may change only {', '.join(RESUMABLE)}")
    for key in RESUMABLE:
        section, _, leaf = key.partition(".")
        out[section][leaf] = new[section][leaf]
    return out


def newest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = run_dir / "checkpoints"
    if (ckpts / "last.ckpt").is_file():
        return ckpts / "last.ckpt"
    steps = sorted(ckpts.glob("step-*.ckpt"))
    return steps[-1] if steps else None


def load_saved(run_dir: Path) -> dict:
    import yaml

    from embedkit.errors import UserError

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"resume={run_dir}: no config.yaml there (not an embedkit run directory)")
    return yaml.safe_load(path.read_text())


def compose_run(args: list[str]) -> tuple[dict, list[str], Path | None]:
    """(config, overrides, checkpoint to resume from or None) from the command line:
    ``resume=RUN_DIR [overrides]``, or a recipe and overrides (``run.resume=auto`` continuing
    ``run.dir`` when it holds a checkpoint)."""
    from embedkit.config import schema
    from embedkit.config.loader import apply_overrides, compose, split_args
    from embedkit.errors import UserError

    resume = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    args = [a for a in args if not a.startswith("resume=")]
    if resume:
        run_dir = Path(resume[-1])
        saved = load_saved(run_dir)
        _, overrides = split_args(args)
        new = schema.validate(apply_overrides(load_saved(run_dir), overrides))
        cfg = resumed_config(saved, new, str(run_dir / "config.yaml"))
        ckpt = newest_checkpoint(run_dir)
        if ckpt is None:
            raise UserError(f"resume={run_dir}: no checkpoint under {run_dir / 'checkpoints'}")
        cfg["run"]["dir"] = str(run_dir)
        return cfg, overrides, ckpt
    cfg = compose(args)
    _, overrides = split_args(args)
    if cfg["run"]["resume"] == "auto":
        name, run_dir = run_paths(cfg)
        ckpt = newest_checkpoint(run_dir) if (run_dir / "config.yaml").is_file() else None
        if ckpt is not None:
            cfg = resumed_config(load_saved(run_dir), cfg, str(run_dir / "config.yaml"))
            cfg["run"]["dir"] = str(run_dir)
            return cfg, overrides, ckpt
    return cfg, overrides, None


def check_inputs(cfg: dict) -> tuple[list[str], list[str]]:
    """Every cheap check, before any model is built: shards (and the demo's, drawn if asked), the
    eval root, the run dir's parent writable. Returns (training shards, validation shards)."""
    import os

    from embedkit.data.datamodule import resolve_shards
    from embedkit.errors import UserError

    root = cfg["data"]["eval"]["root"]
    if root and not Path(root).is_dir():
        raise UserError(f"data.eval.root: no such folder {root}")
    shards = resolve_shards(cfg["data"], log=lambda m: print(m, flush=True))
    parent = Path(cfg["run"]["dir"]).resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"run.dir: {cfg['run']['dir']} cannot be created ({parent} is not writable)")
    return shards


def main(args: list[str]) -> int:
    import shutil

    cfg, overrides, ckpt = compose_run(args)
    name, run_dir = run_paths(cfg)
    cfg["run"]["name"], cfg["run"]["dir"] = name, str(run_dir)
    shards = check_inputs(cfg)
    created = not run_dir.exists()
    fit = Fit(cfg, overrides, ckpt, shards)
    inherited = os.environ.get(RUN_NAME_ENV)
    os.environ[RUN_NAME_ENV] = name  # the launched ranks inherit it (only for this fit)
    try:
        return fit.run()
    except BaseException:
        if created and not fit.trained and run_dir.exists():  # failed before its first step: leave nothing
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if inherited is None:
            os.environ.pop(RUN_NAME_ENV, None)
        else:
            os.environ[RUN_NAME_ENV] = inherited


class Fit:
    """One ``embedkit fit``: the config's sections handed to the builders, then training."""

    def __init__(self, cfg: dict, overrides: list[str], ckpt: Path | None, shards: tuple[list[str], list[str]]):
        self.cfg, self.overrides, self.ckpt, self.shards = cfg, overrides, ckpt, shards
        self.trained = False

    def run(self) -> int:  # noqa: C901  (the one place the sections meet)
        started = time.monotonic()
        cfg, ckpt = self.cfg, self.ckpt
        name, run_dir = cfg["run"]["name"], Path(cfg["run"]["dir"])
        import lightning as L

        from embedkit.config.loader import to_yaml
        from embedkit.console import progress_mode
        from embedkit.data.datamodule import EmbeddingDataModule
        from embedkit.files import write_atomic
        from embedkit.training.callbacks import AtomicLastCheckpoint, CleanStop, LogProgress, exit_code_for
        from embedkit.training.module import EmbeddingModule

        tracking, train, trainer_cfg, ev = cfg["tracking"], cfg["train"], cfg["trainer"], cfg["data"]["eval"]
        quiet_third_party_noise(tracking["enabled"])
        config_path = run_dir / "config.yaml"
        write_atomic(config_path, to_yaml(cfg))
        print(f"run {name}: {run_dir}" + (f" (resuming from {ckpt})" if ckpt else ""), flush=True)

        from embedkit.training.optim import total_steps

        seed = cfg["seed"]
        if trainer_cfg["tf32"]:
            import torch

            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        L.seed_everything(seed, workers=True, verbose=False)
        module = EmbeddingModule.build(cfg["model"], cfg["loss"], train, seed=seed, max_steps=trainer_cfg["max_steps"],
                                       config=cfg)
        train_shards, val_shards = self.shards
        # trainer.max_epochs > 0: the run length in optimizer steps, from the training examples' count
        max_steps = module.max_steps = total_steps(module.max_steps, trainer_cfg["max_epochs"], train_shards,
                                                   train["global_batch_size"] * module.accumulate)
        if trainer_cfg["max_epochs"]:
            print(f"trainer.max_epochs={trainer_cfg['max_epochs']}: {max_steps} optimizer steps", flush=True)
        chunk_size = train["chunk_size"]
        data = EmbeddingDataModule(cfg["data"], module.encoder.processor(), train_shards, val_shards, seed=seed,
                                   global_batch_size=train["global_batch_size"], chunk_size=chunk_size,
                                   chunk_tokens=train["chunk_tokens"], accumulate=module.accumulate,
                                   sort_chunks=train["sort_chunks"])

        logger = False
        id_path = run_dir / "mlflow_run_id"
        if tracking["enabled"]:
            from embedkit.tracking.mlflow_setup import make_logger

            run_id = id_path.read_text().strip() if ckpt and id_path.is_file() else None
            logger = make_logger(tracking, cfg["recipe"], name, run_id=run_id)
        interval = trainer_cfg["val_check_interval"]
        mode = progress_mode(trainer_cfg["progress"])
        checkpoints = AtomicLastCheckpoint(run_dir / "checkpoints", every=trainer_cfg["checkpoint_every"],
                                           keep=trainer_cfg["keep_checkpoints"])
        extra = [trainer_cfg["stop_signal"]] if trainer_cfg["stop_signal"] else []
        stop = CleanStop(checkpoints, extra)
        callbacks = [checkpoints, stop]
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
            from embedkit.tracking.mlflow_setup import log_run_inputs, mark_running, tag_mined_shards

            if ckpt:
                mark_running(logger)
            else:
                log_run_inputs(logger, cfg, config_path, self.overrides)
                tag_mined_shards(logger, train_shards)
            if trainer.is_global_zero:
                write_atomic(id_path, logger.run_id + "\n")

        before = after = None
        if validate and not ckpt:
            trainer.validate(module, datamodule=data, verbose=False)
            before = module.val_results.get("val/p@1")
        self.trained = True  # from here on the run dir holds a run (an MLflow run, checkpoints)
        # weights_only=False: our own checkpoint, holding the RNG states (numpy arrays) besides tensors
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt) if ckpt else None, weights_only=False)
        if module.diverged_at is not None:
            return self.diverged(trainer, module, checkpoints, logger)
        if stop.stopped_at is not None:
            if logger and trainer.is_global_zero:
                from embedkit.tracking.mlflow_setup import mark_ended

                mark_ended(logger, "KILLED")
            if trainer.is_global_zero:
                print(f"stopped at step {stop.stopped_at}; resume with: embedkit fit resume={run_dir}", flush=True)
            return exit_code_for(stop.signum)
        if validate:
            trainer.validate(module, datamodule=data, verbose=False)
            after = module.val_results.get("val/p@1")
        if trainer.is_global_zero:
            if before is not None and after is not None:
                n = module.val_results["num_queries"]
                print(f"held-out P@1 ({n} queries, each against {n} candidates): "
                      f"before {before:.3f} -> after {after:.3f}  (chance {1 / n:.3f})", flush=True)
            elif after is not None:
                print(f"held-out P@1: {after:.3f}", flush=True)
            print(f"checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}  "
                  f"({time.monotonic() - started:.0f}s wall)", flush=True)
        return 0

    def diverged(self, trainer, module, checkpoints, logger) -> int:
        if logger and trainer.is_global_zero:
            from embedkit.tracking.mlflow_setup import mark_ended

            mark_ended(logger, "FAILED")
        if trainer.is_global_zero:
            good = checkpoints.last_good or newest_checkpoint(Path(self.cfg["run"]["dir"]))
            print(f"stopped at step {module.diverged_at}: non-finite {module.nonfinite} for {module.consecutive_skips} "
                  f"consecutive steps (train.max_skipped_steps), none applied; last good checkpoint: "
                  f"{good or 'none'}", flush=True)
        return EXIT_DIVERGED
