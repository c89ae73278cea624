"""``embedkit fit``: compose the config, build model + data, train, validate before and after.

The config is read here once; each setup step of ``Fit`` gets its section or the values it needs
(the module its ``model``/``loss``/``train`` sections, the datamodule its ``data`` section and the
batch words, the logger its ``tracking`` section, the trainer its ``trainer`` section). The run
directory's layout is ``RunDir``'s.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from embedkit.commands._options import Verb
from embedkit.config.flat import flatten
from embedkit.runs import RunDir

#: the command line (``embedkit fit --help``): config words, ``resume=`` (read by ``compose_run``) and
#: ``trust_checkpoint=`` (read by ``trust_word``)
VERB = Verb("fit", "train (no recipe: the demo, a tiny VLM on drawn scenes, CPU, minutes)", config=("",),
            words=(("resume=RUN_DIR", "continue that run from its newest checkpoint; a resume may change only "
                                      "trainer.max_steps, the logging and checkpoint cadence and tracking.tags"),
                   ("trust_checkpoint=true", "resume from a checkpoint you trust with the full unpickler (it may "
                                             "run code from the file); default: weights and embedkit's states only"),
                   ("init_from=RUN_DIR|EXPORT", "start from that model's weights with a fresh optimizer and schedule "
                                                "(a new stage; = run.init_from; LoRA folded, a new adapter trained)")))

#: the run name the launching process chose, for the ranks Lightning's DDP launcher starts later by
#: re-running the command line (a default name drawn from the clock again would be another run dir)
RUN_NAME_ENV = "EMBEDKIT_RUN_NAME"


def run_paths(cfg: dict) -> tuple[str, RunDir]:
    """(run name, run dir) of the ``run`` section: ``run.name`` (else the launching process's, else
    ``<recipe>-<time>``) and ``run.dir`` (else ``runs/<name>``)."""
    name = (cfg["run"]["name"] or os.environ.get(RUN_NAME_ENV)
            or f"{cfg['recipe'] or 'run'}-{datetime.now():%Y%m%d-%H%M%S}")
    return name, RunDir(cfg["run"]["dir"] or Path("runs") / name)


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


def make_strategy(trainer: dict, resume: str = "resume=RUN_DIR"):
    """``trainer.strategy``, with ``fsdp2``: FSDP2 (``fully_shard``) data parallel over every device.

    DDP (``ddp``, or ``auto`` over several devices or nodes) and FSDP2 watch their ranks
    (``distributed.watch``): collectives time out after ``trainer.collective_timeout_s``, and a rank
    that dies stops the others with one line naming it and the ``resume`` words. The schema has
    already checked the combination (an integer ``trainer.devices`` for fsdp2).
    """
    strategy, devices = trainer["strategy"], trainer["devices"]
    several = trainer["num_nodes"] > 1 or (isinstance(devices, int) and devices > 1)
    if strategy not in ("ddp", "fsdp2") and not (strategy == "auto" and several):
        return strategy
    import signal

    from embedkit.distributed.watch import RankWatch, watched_strategy

    stops = [signal.SIGTERM, signal.SIGINT] + ([getattr(signal, trainer["stop_signal"])] if trainer["stop_signal"] else [])
    # the exits all ranks reach together (a clean stop, the non-finite guard): a rank ending so did not die
    agreed = (0, EXIT_DIVERGED, *(128 + int(s) for s in stops))
    watch = RankWatch(resume, trainer["collective_timeout_s"], agreed)
    if strategy != "fsdp2":
        return watched_strategy("ddp", watch)
    # one consolidated checkpoint file (as with DDP), not a distributed-checkpoint folder
    return watched_strategy("fsdp2", watch, data_parallel_size=devices * trainer["num_nodes"], tensor_parallel_size=1,
                            save_distributed_checkpoint=False)


#: keys a resume may change: they leave the training math as it was (``tracking.tags.*`` too).
#: ``trainer.max_steps`` extends (or shortens) the run; the cosine schedule is rebuilt for the new length.
RESUMABLE = ("trainer.max_steps", "trainer.progress", "trainer.val_check_interval", "trainer.log_every_n_steps",
             "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.stop_signal", "trainer.collective_timeout_s",
             "train.max_skipped_steps",
             "tracking.tags", "run.resume")
#: exit status when the non-finite guard stops a run (signals: 128 + the signal number, e.g. 143, 130)
EXIT_DIVERGED = 3


def resumed_config(saved: dict, new: dict, where: str) -> dict:
    """The saved config with the changes a resume may make taken from ``new``; ConfigError naming the
    first other key that differs (``run.name``/``run.dir`` keep the saved values)."""
    import copy

    from embedkit.errors import ConfigError

    old_flat, new_flat = flatten(saved), flatten(new)
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


def resume_config(run: RunDir, args: list[str]) -> tuple[dict, list[str], Path | None]:
    """``resume=RUN_DIR [overrides]``: (the run's saved config with the overrides a resume may make,
    the overrides, its newest checkpoint; None for a run stopped before its first checkpoint, which
    starts again from step 0 and continues its MLflow run)."""
    from embedkit.config import schema
    from embedkit.config.loader import apply_overrides, overridden_keys, split_args

    saved = run.saved_config("resume")
    _, overrides = split_args(args)
    new = schema.validate(apply_overrides(saved, overrides), overridden=overridden_keys(overrides))
    cfg = resumed_config(saved, new, str(run.config_path))
    ckpt = run.newest_good_checkpoint(warn=rank_zero_warn)
    if ckpt is None:
        restart_warning(run, "resume")
    cfg["run"]["dir"] = str(run.path)
    return cfg, overrides, ckpt


def restart_warning(run: RunDir, what: str) -> None:
    rank_zero_warn(f"warning: {what}={run.path}: the run stopped before its first checkpoint; starting it again "
                   "from step 0 (its saved config, its MLflow run)")


#: the environment variables that number a process among a job's ranks (Lightning's launcher sets
#: ``LOCAL_RANK`` for the ranks it starts; torchrun ``RANK``; SLURM ``SLURM_PROCID``; a node ``NODE_RANK``)
RANK_ENVS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def launching_process() -> bool:
    """Whether this process is the one that launched the run (global rank 0): it alone holds the run
    dir's lock and says what the others would say again."""
    return all(os.environ.get(var, "0") in ("", "0") for var in RANK_ENVS)


def rank_zero_warn(line: str) -> None:
    if launching_process():
        print(line, file=sys.stderr, flush=True)


def compose_run(args: list[str]) -> tuple[dict, list[str], Path | None, bool]:
    """(config, overrides, checkpoint to resume from or None, whether the run dir's run is continued)
    from the command line: ``resume=RUN_DIR [overrides]``, or a recipe and overrides (``run.resume=auto``
    continuing ``run.dir`` when it holds a run). A continued run without a checkpoint (killed before its
    first) starts again from step 0 with its saved config, logging to its MLflow run."""
    from embedkit.config.loader import compose, split_args

    resume = [a.split("=", 1)[1] for a in args if a.startswith("resume=")]
    args = [f"run.{a}" if a.startswith("init_from=") else a for a in args if not a.startswith("resume=")]
    if resume and any(a.startswith("run.init_from=") for a in args):
        from embedkit.errors import UserError

        raise UserError("init_from: not with resume= (a resume continues its own run's weights; init_from starts "
                        "a new run from another's)")
    if resume:
        return (*resume_config(RunDir(resume[-1]), args), True)
    cfg = compose(args)
    _, overrides = split_args(args)
    if cfg["run"]["resume"] == "auto":
        _, run = run_paths(cfg)
        if run.is_run():
            ckpt = run.newest_good_checkpoint(warn=rank_zero_warn, what="run.resume=auto: run.dir")
            if ckpt is None:
                restart_warning(run, "run.resume=auto: run.dir")
            cfg = resumed_config(run.saved_config("resume"), cfg, str(run.config_path))
            cfg["run"]["dir"] = str(run.path)
            return cfg, overrides, ckpt, True
    return cfg, overrides, None, False


def trust_word(args: list[str]) -> tuple[bool, list[str]]:
    """(``trust_checkpoint=true|false``'s value, default false; the other words). Not a config key: it
    says how to read the checkpoint a resume starts from, not how to train."""
    from embedkit.config.loader import parse_value
    from embedkit.errors import UserError

    words = [a.split("=", 1)[1] for a in args if a.startswith("trust_checkpoint=")]
    value = parse_value(words[-1]) if words else False
    if not isinstance(value, bool):
        raise UserError(f"trust_checkpoint: expected true or false, got {words[-1]!r}")
    return value, [a for a in args if not a.startswith("trust_checkpoint=")]


def check_inputs(cfg: dict) -> tuple[list[str] | None, list[str] | None]:
    """Every user error found without building a model or drawing data: the shards named
    (``check_shards``), the eval root, the init_from parent, B3's teacher, the run dir's parent writable. Returns ``check_shards``'s
    answer (None for a side the demo data will supply; ``Fit`` draws it)."""
    from embedkit.data.datamodule import check_shards
    from embedkit.errors import UserError

    root = cfg["data"]["eval"]["root"]
    if root and not Path(root).is_dir():
        raise UserError(f"data.eval.root: no such folder {root}")
    shards = check_shards(cfg["data"])
    parent = cfg["run"].get("init_from")  # .get: a resumed run saved before the key existed
    if parent and not Path(parent).expanduser().exists():
        raise UserError(f"init_from: {parent} does not exist")
    if cfg["data"]["train"].get("batching") == "b3":  # before any model is built or data drawn
        teacher = cfg["data"]["train"]["b3"]["teacher"]
        if not teacher:
            raise UserError("data.train.b3.teacher is not set: data.train.batching=b3 ranks the training set with a "
                            "teacher (a run dir, checkpoint, export or sentence-transformers folder)")
        if not Path(teacher).expanduser().exists():
            raise UserError(f"data.train.b3.teacher: {teacher} does not exist")
    target = Path(cfg["run"]["dir"]).resolve()
    existing = next(p for p in target.parents if p.exists())
    if not os.access(existing, os.W_OK):
        raise UserError(f"run.dir: {cfg['run']['dir']} cannot be created ({existing} is not writable)")
    return shards


@contextlib.contextmanager
def run_name_for_ranks(name: str):
    """``RUN_NAME_ENV`` set to ``name`` inside the block (the launched ranks inherit it), then restored."""
    inherited = os.environ.get(RUN_NAME_ENV)
    os.environ[RUN_NAME_ENV] = name
    try:
        yield
    finally:
        if inherited is None:
            os.environ.pop(RUN_NAME_ENV, None)
        else:
            os.environ[RUN_NAME_ENV] = inherited


def main(args: list[str]) -> int:
    import shutil

    from embedkit.encoder import read_checkpoint

    trust, args = trust_word(args)
    cfg, overrides, ckpt, continuing = compose_run(args)
    if ckpt is not None:  # refused here, before anything is built, unless weights-only can read it
        read_checkpoint(ckpt, trust=trust)
    name, run = run_paths(cfg)
    cfg["run"]["name"], cfg["run"]["dir"] = name, str(run.path)
    shards = check_inputs(cfg)
    created = not run.path.exists()
    fit = Fit(cfg, overrides, ckpt, shards, trust=trust, continuing=continuing)
    # one fit per run dir: the launching process holds the lock; the ranks it starts run under it
    lock = run.lock(warn=rank_zero_warn) if launching_process() else contextlib.nullcontext()
    with lock, run_name_for_ranks(name):
        try:
            return fit.run()
        except BaseException:
            if created and not fit.trained and run.path.exists():  # failed before its first step: leave nothing
                shutil.rmtree(run.path, ignore_errors=True)
            raise


def parent_lineage(spec: str, provenance) -> dict:
    """The lineage of an init_from parent: a run dir's (or the run dir of a checkpoint) with the step its
    weights were taken at; an export's as its ``embedkit.json`` records it (the run it was exported from)."""
    from embedkit.tracking import lineage

    if provenance.kind == "export":
        from embedkit.export.reader import read_meta

        meta = read_meta(Path(spec).expanduser())
        config = meta.get("training_config") or {}
        return meta.get("lineage") or lineage.node((config.get("run") or {}).get("name") or Path(spec).name, spec,
                                                   "fit", provenance.step)
    run = RunDir(spec) if provenance.kind == "run" else RunDir.of_checkpoint(provenance.checkpoint)
    if run is None or not run.is_run():
        return lineage.node(Path(spec).name, spec, "fit", provenance.step)
    tree = lineage.of_run(run, provenance.step)
    tree["step"] = provenance.step
    return tree


class Fit:
    """One ``embedkit fit``: setup steps that each get their config section, then ``train`` and ``report``.

    ``shards``: ``check_inputs``'s answer; the demo data it leaves to draw is drawn by
    ``_prepare_shards``, the first step after the run dir (in every process: the launching one draws
    it, ranks started later find it in its cache).
    """

    def __init__(self, cfg: dict, overrides: list[str], ckpt: Path | None,
                 shards: tuple[list[str] | None, list[str] | None], trust: bool = False, continuing: bool = False):
        self.cfg, self.overrides, self.ckpt, self.checked_shards = cfg, overrides, ckpt, shards
        # the run dir's run continued (a resume; a restart of one killed before its first checkpoint)
        self.continuing = continuing or ckpt is not None
        self.trust = trust  # trust_checkpoint=true: the resumed checkpoint read with the full unpickler
        self.trained = False  # set once training starts: the run dir then holds a run

    def run(self) -> int:
        import lightning as L

        started = time.monotonic()
        cfg = self.cfg
        self._setup_process(cfg["trainer"], cfg["tracking"])
        self.run_dir = self._setup_run_dir(cfg["run"])
        train_shards, val_shards = self._prepare_shards(cfg["data"])
        self.accumulate = cfg["train"]["accumulate_steps"]  # the module, the data and the run length need it
        self.max_steps = self._run_length(cfg["trainer"], cfg["train"], train_shards)
        L.seed_everything(cfg["seed"], workers=True, verbose=False)
        self.module = self._setup_module(cfg["model"], cfg["loss"], cfg["train"], cfg["seed"])
        self.lineage = self._setup_init_from(cfg["run"])
        self.b3 = self._setup_b3(cfg["data"]["train"], cfg["seed"], train_shards)
        self.data = self._setup_data(cfg["data"], cfg["train"], cfg["seed"], train_shards, val_shards)
        self.validating = len(self.data.val_examples) > 0
        self._setup_held_out()
        self.logger = self._setup_logger(cfg["tracking"], cfg["recipe"])
        self.callbacks = self._setup_callbacks(cfg["trainer"], cfg["data"]["eval"], cfg["train"])
        self.trainer = self._setup_trainer(cfg["trainer"])
        self._record_run(train_shards)
        try:
            before, after = self.train()
        except Exception as exc:  # a rank died: one line naming it (re-raised when it was something else)
            return self.lost_rank(exc)
        return self.report(before, after, started)

    # -- setup steps, in order ------------------------------------------------------------------
    def _setup_process(self, trainer: dict, tracking: dict) -> None:
        """Process-wide settings: a quiet console, TF32 matmuls where asked, the signals that stop the
        run cleanly besides SIGTERM and SIGINT (the loader workers ignore them all)."""
        quiet_third_party_noise(tracking["enabled"])
        self.stop_signals = [trainer["stop_signal"]] if trainer["stop_signal"] else []
        if trainer["tf32"]:
            import torch

            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _setup_run_dir(self, run: dict) -> RunDir:
        """The run dir with the resolved config written into it (before the first step)."""
        from embedkit.config.loader import to_yaml

        run_dir = RunDir(run["dir"])
        run_dir.write_config(to_yaml(self.cfg))
        print(f"run {run['name']}: {run_dir.path}" + (f" (resuming from {self.ckpt})" if self.ckpt else ""),
              flush=True)
        return run_dir

    def _prepare_shards(self, data: dict) -> tuple[list[str], list[str]]:
        """(training shards, validation shards): the checked ones, the demo's drawn where asked (the one
        expensive input step, before the seed: drawing leaves the model's initialisation as it was)."""
        from embedkit.data.datamodule import resolve_shards

        return resolve_shards(data, log=lambda m: print(m, flush=True), checked=self.checked_shards)

    def _run_length(self, trainer: dict, train: dict, train_shards: list[str]) -> int:
        """Optimizer steps of the run: ``trainer.max_steps``, or ``trainer.max_epochs`` passes over the
        training examples (``total_steps``)."""
        from embedkit.training.optim import total_steps

        steps = total_steps(trainer["max_steps"], trainer["max_epochs"], train_shards,
                            train["global_batch_size"] * self.accumulate)
        if trainer["max_epochs"]:
            print(f"trainer.max_epochs={trainer['max_epochs']}: {steps} optimizer steps", flush=True)
        return steps

    def _setup_module(self, model: dict, loss: dict, train: dict, seed: int):
        from embedkit.training.module import EmbeddingModule

        return EmbeddingModule.build(model, loss, train, seed=seed, max_steps=self.max_steps,
                                     accumulate=self.accumulate, config=self.cfg)

    def _setup_init_from(self, run: dict) -> dict | None:
        """``run.init_from``: the parent's weights (LoRA folded) into the module built from this run's own
        config (architecture checked first: one line naming the key), and ``lineage.json`` naming the
        parent with its own lineage (export/init_from.py, tracking/lineage.py); returns the lineage, None
        without a parent. Not on a resume: the checkpoint holds the run's own weights by then."""
        from embedkit.tracking import lineage

        if not run.get("init_from"):
            return lineage.of_run(self.run_dir) if self.run_dir.lineage_path.is_file() else None
        if self.ckpt is not None:
            return lineage.of_run(self.run_dir)
        from embedkit.export.init_from import check_architecture, load_parent, parent_state

        config, state, provenance = parent_state(run["init_from"], self.trust)
        check_architecture(config, self.cfg, run["init_from"])
        copied = load_parent(self.module.encoder, state, run["init_from"])
        print(f"init_from {run['init_from']}: {copied} tensors of its weights (step {provenance.step}); a fresh "
              "optimizer and schedule", flush=True)
        tree = lineage.node(run["name"], self.run_dir.path, "fit init_from",
                            parents=[parent_lineage(run["init_from"], provenance)])
        if launching_process():
            lineage.write(self.run_dir, tree)
        return tree

    def _setup_b3(self, train: dict, seed: int, train_shards: list[str]):
        """``data.train.batching=b3``: the partition the batches are drawn from (mining/b3_ranking.py: the
        run dir's on a resume, else the cache's, else ranked by the teacher now); None otherwise. After the
        module is built, so ranking leaves the model's initialisation as it was."""
        if train.get("batching", "random") != "b3":
            return None
        from embedkit.data.b3 import B3Settings
        from embedkit.data.demo import cache_base
        from embedkit.data.shard_set import ShardSet
        from embedkit.errors import UserError
        from embedkit.mining.b3_ranking import ensure_partition

        b3 = train["b3"]
        try:
            settings = B3Settings(tuple(b3["window"]), b3["cluster_size"], b3["resolution"])
            return ensure_partition(b3["teacher"], ShardSet(train_shards), settings, seed,
                                    cache_base({"cache_dir": b3["cache_dir"]}), self.run_dir.b3_partition_path,
                                    b3["batch_size"], log=lambda m: print(m, flush=True))
        except ValueError as exc:
            raise UserError(str(exc)) from None

    def _setup_data(self, data: dict, train: dict, seed: int, train_shards: list[str], val_shards: list[str]):
        from embedkit.data.datamodule import EmbeddingDataModule

        return EmbeddingDataModule(data, self.module.encoder.processor(), train_shards, val_shards, seed=seed,
                                   global_batch_size=train["global_batch_size"], chunk_size=train["chunk_size"],
                                   chunk_tokens=train["chunk_tokens"], accumulate=self.accumulate,
                                   sort_chunks=train["sort_chunks"], stop_signals=self.stop_signals, b3=self.b3)

    def _setup_held_out(self) -> None:
        """A graded held-out set (the docs demo's qrels) is scored by eval.ranking's NDCG@5, its metric."""
        if self.data.held_out.qrels is not None:
            import functools

            from embedkit.eval.ranking import ndcg_at_k

            self.module.graded_metric = functools.partial(ndcg_at_k, k=5, allow_empty=True)

    def _setup_logger(self, tracking: dict, recipe: str | None):
        """The MLflow logger (continuing the run's MLflow run on a resume), or False."""
        if not tracking["enabled"]:
            return False
        from embedkit.tracking.mlflow_setup import make_logger

        run_id = self.run_dir.mlflow_run_id() if self.continuing else None
        return make_logger(tracking, recipe, self.cfg["run"]["name"], run_id=run_id)

    def _setup_callbacks(self, trainer: dict, ev: dict, train: dict) -> list:
        """Checkpoints, the clean stop on signals, plain progress lines (``trainer.progress=log``) and
        MMEB validation (``data.eval.root`` with ``val_rows``)."""
        from embedkit.console import progress_mode
        from embedkit.training.callbacks import AtomicLastCheckpoint, CleanStop, LogProgress

        self.checkpoints = AtomicLastCheckpoint(self.run_dir, every=trainer["checkpoint_every"],
                                                keep=trainer["keep_checkpoints"])
        self.stop = CleanStop(self.checkpoints, self.stop_signals)
        callbacks = [self.checkpoints, self.stop]
        if progress_mode(trainer["progress"]) == "log":
            callbacks.append(LogProgress(max(trainer["log_every_n_steps"], self.max_steps // 20)))
        if self.validating and ev["root"] and ev["val_rows"] > 0:
            from embedkit.eval.callback import MMEBValidation

            callbacks.append(MMEBValidation(ev["root"], ev["datasets"], max_rows=ev["val_rows"],
                                            chunk_size=train["chunk_size"]))
        return callbacks

    def _setup_trainer(self, trainer: dict):
        import lightning as L

        from embedkit.console import progress_mode

        interval, max_steps = trainer["val_check_interval"], self.max_steps
        every = interval if interval and self.validating else max_steps + 1  # optimizer steps between validations
        return L.Trainer(
            max_steps=max_steps, devices=trainer["devices"], num_nodes=trainer["num_nodes"],
            accelerator=trainer["accelerator"], strategy=make_strategy(trainer, f"resume={self.run_dir.path}"),
            precision=trainer["precision"], logger=self.logger, callbacks=self.callbacks,
            log_every_n_steps=min(trainer["log_every_n_steps"], max_steps), enable_progress_bar=progress_mode(trainer["progress"]) == "bar",
            enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
            check_val_every_n_epoch=None, use_distributed_sampler=False, default_root_dir=str(self.run_dir.path),
            val_check_interval=every * self.accumulate, limit_val_batches=None if self.validating else 0,
        )

    def _record_run(self, train_shards: list[str]) -> None:
        """MLflow: a fresh run gets its params, artifacts and tags, a resumed one is running again; the
        run dir keeps the MLflow run id (so a resume continues it)."""
        logger = self.logger
        if not logger:
            return
        from embedkit.tracking.mlflow_setup import has_params, log_run_inputs, mark_running, tag_mined_shards

        if self.continuing:
            mark_running(logger)
        if not (self.continuing and has_params(logger)):  # a restart killed before its inputs were logged too
            log_run_inputs(logger, self.cfg, self.run_dir.config_path, self.overrides)
            tag_mined_shards(logger, train_shards)
        if self.trainer.is_global_zero:
            self.run_dir.write_mlflow_run_id(logger.run_id)
            if self.lineage and not self.continuing:  # the parents and the chain (tracking/lineage.py)
                from embedkit.tracking.lineage import tags

                for key, value in tags(self.lineage).items():
                    logger.experiment.set_tag(logger.run_id, key, value)

    # -- training and the report ----------------------------------------------------------------
    def train(self) -> tuple[dict, dict]:
        """Validate (a fresh run), train, validate again (a run that ended normally): the metrics of
        the validation before and after training, ``{}`` for one not run."""
        import torch

        from embedkit.encoder import checkpoint_globals

        before = self.validate() if self.validating and not self.ckpt else {}
        self.trained = True  # from here on the run dir holds a run (an MLflow run, checkpoints)
        # the resume reads the checkpoint as read_checkpoint does: weights-only, embedkit's own types allowed
        with torch.serialization.safe_globals(checkpoint_globals()):
            self.trainer.fit(self.module, datamodule=self.data, ckpt_path=str(self.ckpt) if self.ckpt else None,
                             weights_only=not self.trust)
        if not self.validating or self.module.diverged_at is not None or self.stop.stopped_at is not None:
            return before, {}
        return before, self.validate()

    def validate(self) -> dict:
        """One validation: the metrics it logged (``val/p@1``; ``val/mmeb/...`` with MMEB validation)."""
        results = self.trainer.validate(self.module, datamodule=self.data, verbose=False)  # one dict per loader
        return {k: float(v) for metrics in results for k, v in metrics.items()}

    def report(self, before: dict, after: dict, started: float) -> int:
        """The closing lines (global zero) and the exit status: 0, a signal's, or ``EXIT_DIVERGED``."""
        from embedkit.training.callbacks import exit_code_for

        if self.module.diverged_at is not None:
            return self.diverged()
        if self.stop.stopped_at is not None:
            self._end_tracking("KILLED")
            if self.trainer.is_global_zero:
                print(f"stopped at step {self.stop.stopped_at}; resume with: embedkit fit resume={self.run_dir.path}",
                      flush=True)
            return exit_code_for(self.stop.signum)
        if self.trainer.is_global_zero:
            metric = f"val/{self.data.held_out.metric}"
            self._print_held_out(before.get(metric), after.get(metric))
            print(f"checkpoint: {self.run_dir.last_checkpoint}  ({time.monotonic() - started:.0f}s wall)", flush=True)
        return 0

    def _print_held_out(self, before: float | None, after: float | None) -> None:
        n = len(self.data.val_examples)  # each held-out example is one query and one candidate
        metric = self.data.held_out.metric
        label = {"p@1": "P@1", "t2v_r@1": "text-to-video R@1", "ndcg@5": "NDCG@5"}.get(metric, metric)
        if before is not None and after is not None:
            chance = "" if metric == "ndcg@5" else f"  (chance {1 / n:.3f})"  # one answer among n candidates
            print(f"held-out {label} ({n} queries, each against {n} candidates): "
                  f"before {before:.3f} -> after {after:.3f}{chance}", flush=True)
        elif after is not None:
            print(f"held-out {label}: {after:.3f}", flush=True)

    def _end_tracking(self, status: str) -> None:
        """The MLflow run's true end status (Lightning marks every fit that returns FINISHED)."""
        if self.logger and self.trainer.is_global_zero:
            from embedkit.tracking.mlflow_setup import mark_ended

            mark_ended(self.logger, status)

    def lost_rank(self, exc: Exception) -> int:
        """``exc`` ended training: when a rank died (or a collective timed out on one out of contact),
        print the line naming it, stop the ranks this process launched, return ``EXIT_RANK_LOST``;
        else re-raise ``exc``."""
        watch = getattr(self.trainer.strategy, "watch", None)
        line = watch.lost_line(exc) if watch is not None else None
        if line is None:
            raise exc
        from embedkit.distributed.watch import EXIT_RANK_LOST

        watch.report(line)
        watch.stop_children()
        return EXIT_RANK_LOST

    def diverged(self) -> int:
        """The non-finite guard stopped the run: say where, and the last good checkpoint."""
        self._end_tracking("FAILED")
        module = self.module
        if self.trainer.is_global_zero:
            good = self.checkpoints.last_good or self.run_dir.newest_checkpoint()
            print(f"stopped at step {module.diverged_at}: non-finite {module.nonfinite} for {module.consecutive_skips} "
                  f"consecutive steps (train.max_skipped_steps), none applied; last good checkpoint: "
                  f"{good or 'none'}", flush=True)
        return EXIT_DIVERGED
