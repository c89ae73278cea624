"""EmbeddingModule: an ``Encoder`` and a loss, trained with GradCache under manual optimization.

A training batch (``TrainBatch``) arrives already split into processed chunks. The encoder turns
chunks into embeddings, the loss sees embeddings only, and ``gradcache.cached_step`` backpropagates
(through the cache when there is more than one chunk). The module owns gradient clipping, the LR
schedule and the optimizer step (manual optimization), so the same code serves one chunk or many.
Held-out validation ranks each validation query against every validation candidate and logs the
metric the datamodule's ``held_out`` names: ``val/p@1``, ``val/t2v_r@1`` (text -> video) or, with graded
qrels, ``val/ndcg@5`` (``trainer.validate`` returns it; further validation, of MMEB subsets, is a
callback the fit command installs).
"""

from __future__ import annotations

import lightning as L
import torch

from embedkit.data.batch import Role, TrainBatch
from embedkit.distributed import distributed_loss
from embedkit.distributed.ranks import all_objects, max_over_ranks, rank_and_world
from embedkit.encoder import Encoder
from embedkit.errors import UserError
from embedkit.losses.base import CandidateMask, Loss, LossOutput, accepts_mask
from embedkit.losses.similarity import similarity_for
from embedkit.losses.teacher import TeacherBatch
from embedkit.training import grad_sync, gradcache
from embedkit.training.data_skips import SkipCounts
from embedkit.training.optim import build_optimizer, build_scheduler


def rng_states() -> dict:
    """Python's, numpy's and torch's (CPU and CUDA) generator states of this process."""
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    import random

    import numpy as np

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def check_teacher_nesting(loss_fn, name: str) -> None:
    """A teacher wrapper (``distill``, ``soft_labels``) must be the outermost loss: the wrappers around
    it (Matryoshka) do not pass the ``teacher`` keyword on. One line, before anything trains."""
    inside = [m for m in loss_fn.modules() if m is not loss_fn and getattr(m, "needs_teacher", False)]
    if inside and not getattr(loss_fn, "needs_teacher", False):
        from embedkit.errors import ConfigError

        raise ConfigError(f"loss: {name} wraps a teacher loss ({type(inside[0]).__name__}), which would get no "
                          f"teacher data; put it outermost, e.g. loss=distill loss.inner={name}")


class EmbeddingModule(L.LightningModule):
    """``encoder`` and ``loss_fn`` trained by the ``train`` config section for ``max_steps`` optimizer
    steps of ``accumulate`` training batches each (the run length and ``train.accumulate_steps``,
    which the fit command reads: the data and the run length need them too).

    ``config`` (the whole resolved config) is stored in checkpoints, never read here: it is what
    ``embedkit.load`` (``export.reader.from_checkpoint``) and ``embedkit eval`` rebuild the model from.
    """

    def __init__(self, encoder: Encoder, loss_fn: Loss, train: dict, *, max_steps: int, accumulate: int,
                 config: dict | None = None):
        super().__init__()
        self.save_hyperparameters({"config": config}, logger=False)
        self.encoder = encoder
        self.loss_fn = loss_fn
        self.train_cfg = train
        self.max_steps = max_steps
        self.accumulate = accumulate
        self.clip = train["clip_grad_norm"]
        self.max_skipped = train["max_skipped_steps"]
        self.mask_duplicates = train["mask_duplicates"]
        self.false_negative_margin = train["false_negative_margin"]
        self.compile = train["compile"]  # torch.compile the encoder's forward of each chunk (encode)
        self._compiled = None
        if (self.mask_duplicates or self.false_negative_margin is not None) and not accepts_mask(loss_fn):
            import logging

            logging.getLogger(__name__).warning(
                "train.mask_duplicates / train.false_negative_margin: the loss %s does not take `mask`; "
                "it trains unmasked", type(loss_fn).__name__)
        self.micro = 0  # training batches seen (micro-batches), continued across a resume
        self.skipped_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, in all
        self.consecutive_skips = 0
        self.diverged_at: int | None = None  # the step the run stopped at for non-finite steps
        # device bool: every loss of the current accumulation cycle finite (read once, at the optimizer step)
        self._cycle_finite: torch.Tensor | None = None
        self.nonfinite = ""  # what the last skipped step found non-finite (for the stop message)
        self._pending_rng: dict | None = None  # restored at the first batch after a resume
        self.data_skips = SkipCounts()  # training samples skipped by the stream, by reason (data_skips.py)
        self.automatic_optimization = False
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # (scores [Q, C], qrels) -> float for a graded held-out set (the datamodule's ``held_out.qrels``):
        # ``embedkit fit`` sets eval.ranking's NDCG@5 (training does not import eval)
        self.graded_metric = None

    @classmethod
    def build(cls, model: dict, loss: dict, train: dict, *, seed: int, max_steps: int, accumulate: int,
              config: dict | None = None) -> "EmbeddingModule":
        """The encoder from the ``model`` section, the loss from ``loss`` (told the embedding size, so
        Matryoshka can reject larger dims), the optimization from ``train``."""
        from embedkit.config import registry

        encoder = Encoder.from_config(model, seed=seed)
        loss_fn = registry.build("loss", loss, embedding_dim=encoder.embedding_dim,
                                 num_layers=encoder.backbone.num_layers, seed=seed)
        if getattr(loss_fn, "needs_layers", False) and encoder.pooling.needs_all_layers:
            from embedkit.errors import ConfigError

            raise ConfigError(f"model.pooling: {model['pooling']['name']} pools across layers; loss "
                              f"{loss['name']} needs one embedding per layer (a head that pools one layer)")
        check_teacher_nesting(loss_fn, loss["name"])
        return cls(encoder, loss_fn, train, max_steps=max_steps, accumulate=accumulate, config=config)

    @classmethod
    def from_config(cls, config: dict) -> "EmbeddingModule":
        """``build`` from a whole resolved config (notebooks, tests): ``trainer.max_steps`` long."""
        return cls.build(config["model"], config["loss"], config["train"], seed=config["seed"],
                         max_steps=config["trainer"]["max_steps"],
                         accumulate=config["train"]["accumulate_steps"], config=config)

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, inputs: dict) -> torch.Tensor:
        """Processed chunk -> embeddings [n, D] (the encoder's forward); per layer [n, L, D] when the
        loss sets ``needs_layers`` (matryoshka_2d). Compiled under ``train.compile``."""
        forward = self.compiled_forward() if self.compile else self.encoder
        return forward(inputs, layers=getattr(self.loss_fn, "needs_layers", False))

    def compiled_forward(self):
        """``torch.compile`` of the encoder's forward, made on first use. A function, not a module
        attribute: a compiled module would enter the module tree and its checkpoint a second time.

        GradCache encodes a chunk twice, without and with grad, under the same RNG state, and needs the
        same dropout masks both times; Inductor's own random numbers do not promise that across its
        inference and training graphs, so Inductor is told to draw them as eager does
        (``fallback_random``, process-wide)."""
        if self._compiled is None:
            import torch._inductor.config as inductor_config

            inductor_config.fallback_random = True
            self._compiled = torch.compile(self.encoder.forward)
        return self._compiled

    def compute_loss(self, q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None,
                     candidate_keys: torch.Tensor | None = None, teacher: TeacherBatch | None = None) -> LossOutput:
        """The loss of one batch's embeddings; ``candidate_keys`` (the batch's content keys, in
        candidate order) feed the false-negative mask; ``teacher`` (taught shards) reaches a loss that
        takes it (``distill``, ``soft_labels``)."""
        # cross-device negatives when distributed (the plain loss otherwise); DDP's gradient
        # averaging then gives the full-batch gradient: see embedkit/distributed/loss.py
        return distributed_loss(self.loss_fn, q, p, n, mask=self.candidate_mask(candidate_keys), teacher=teacher)

    def teacher_of(self, batch: TrainBatch) -> TeacherBatch | None:
        """The batch's teacher data for the loss (None when it has none); a loss that needs it
        (``needs_teacher``) and a batch without it is one line naming the training shards."""
        fields = (batch.teacher_queries, batch.teacher_candidates, batch.teacher_scores)
        if any(f is not None for f in fields):
            return TeacherBatch(*fields)
        if getattr(self.loss_fn, "needs_teacher", False):
            dm = self.trainer.datamodule if self._trainer is not None else None
            shards = getattr(dm, "train_shards", None) or ["(unknown)"]
            where = shards[0] + (f" and {len(shards) - 1} more" if len(shards) > 1 else "")
            raise UserError(f"loss={type(self.loss_fn).__name__.lower()}: a training batch carries no teacher data: "
                            f"the shards {where} were not made by `embedkit teach model=TEACHER shards=SRC out=DST`")
        return None

    def candidate_mask(self, candidate_keys: torch.Tensor | None) -> CandidateMask | None:
        """The in-batch false-negative mask of ``train.mask_duplicates`` / ``train.false_negative_margin``.
        Training batches always carry the keys (``ChunkCollate``); a direct call without them (embeddings
        of no known content) masks by margin only."""
        keys = candidate_keys if self.mask_duplicates else None
        if keys is None and self.false_negative_margin is None:
            return None
        return CandidateMask(keys, self.false_negative_margin)

    # -- training ---------------------------------------------------------------------------
    def configure_model(self):
        """FSDP2 (Lightning ``ModelParallelStrategy``): shard the backbone and the pooling head.

        The loss's own parameters (a learnable temperature) stay plain tensors, replicated; their
        gradients are averaged over ranks with the other unsharded ones (``_sync_gradients``).
        """
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or grad_sync.fsdp2_roots(self):
            return
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["data_parallel"]
        fully_shard(self.encoder.backbone, mesh=dp_mesh)
        if any(p.requires_grad for p in self.encoder.pooling.parameters()):
            fully_shard(self.encoder.pooling, mesh=dp_mesh)

    def _sync_gradients(self) -> None:
        """Once per optimizer step: average over ranks every gradient no data-parallel engine reduced."""
        from torch.distributed.tensor import DTensor

        params = [p for p in self.parameters() if p.requires_grad and not isinstance(p, DTensor)]
        grad_sync.average_gradients(params)

    def at_step_boundary(self) -> bool:
        """True between optimizer steps (never inside an accumulation cycle)."""
        return self.micro % self.accumulate == 0

    def training_step(self, batch: TrainBatch, batch_idx: int):
        opt = self.optimizers()
        accumulate = self.accumulate
        # the module's own batch counter (not Lightning's batch_idx): it continues across a resume
        index = self.micro
        self.micro += 1
        if index % accumulate == 0:
            opt.zero_grad(set_to_none=True)
            self._cycle_finite = None
        ends_step = (index + 1) % accumulate == 0  # the last micro-batch of an optimizer step
        sharded = bool(grad_sync.fsdp2_roots(self))
        if sharded:  # FSDP2: accumulate unsharded grads; reduce-scatter on the step's last backward
            grad_sync.set_fsdp_sync(self, False)

        def before_last_backward():
            if sharded and ends_step:
                grad_sync.set_fsdp_sync(self, True)

        # FSDP2: every forward all-gathers parameters, so ranks run as many passes (token budgets differ)
        passes = self.agree_passes(batch) if sharded and self.trainer.world_size > 1 else 0
        out = self.backward_batch(batch, self.manual_backward, scale=1.0 / accumulate,
                                  before_last_backward=before_last_backward, min_passes=passes)
        # stays on the device: read once per optimizer step, by _guarded_step
        finite = torch.isfinite(out.loss.detach())
        self._cycle_finite = finite if self._cycle_finite is None else self._cycle_finite & finite
        if ends_step:
            self._sync_gradients()
            self._guarded_step(opt)
        self.log_step(batch, out, opt)
        return out.loss

    def log_step(self, batch: TrainBatch, out: LossOutput, opt) -> None:
        """The step's metrics, without a host sync: device values are logged as device tensors (Lightning
        reads them back once per ``trainer.log_every_n_steps``), host values as CPU tensors (a Python float
        would be copied to the device, a blocking copy, every step). ``train/loss`` goes to the progress
        bar only when there is one: Lightning reads progress-bar values back after every batch."""
        B = batch.per_device_batch
        # distributed, each rank's loss is over its own rows: sync_dist reports the full-batch mean
        bar = self._trainer is not None and self.trainer.progress_bar_callback is not None
        self.log("train/loss", out.loss, prog_bar=bar, batch_size=B, sync_dist=True)
        self.log("train/lr", torch.tensor(float(opt.param_groups[0]["lr"])), batch_size=B)
        self.log("train/skipped_steps", torch.tensor(float(self.skipped_steps)), batch_size=B)
        masked = out.parts.pop("masked_negatives", None)
        if masked is not None:  # dropped (query, candidate) pairs of the whole global batch
            self.log("train/masked_negatives", masked, batch_size=B, sync_dist=True, reduce_fx="sum")
        if batch.padded_tokens:  # this rank's padding share of its forward passes (ChunkCollate counts it)
            self.log("train/pad_fraction", torch.tensor(batch.pad_fraction), batch_size=B)
        for name, value in out.parts.items():
            self.log(f"train/loss/{name}", value, batch_size=B, sync_dist=True)
        if self._trainer is not None and self.trainer._logger_connector.should_update_logs:
            totals = self.data_skips.totals(self.device)  # the ranks' sum, at the logging interval only
            for reason, n in totals.items():
                self.log(f"data/skipped/{reason}", torch.tensor(float(n)), batch_size=B)
            self.data_skips.report(totals)

    def _grads_finite(self) -> torch.Tensor:
        """Device bool: every gradient finite. GradScaler's own check (one multi-tensor kernel per device
        and dtype, unscaling by 1: the gradients are unchanged), so no value leaves the device."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in self.parameters():
            if p.grad is not None:
                g = getattr(p.grad, "_local_tensor", p.grad)
                groups.setdefault((g.device, g.dtype), []).append(g)
        found = torch.zeros((), device=self.device)
        for (device, _), grads in groups.items():
            flag = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, torch.ones(1, device=device))
            found = found + flag.to(found.device).squeeze(0)
        return found == 0

    def _guarded_step(self, opt) -> None:
        """Clip and step, unless the loss or a gradient is non-finite on any rank: then the step is
        consumed without an update (gradients dropped, so the optimizer touches no parameter and no
        moment; the step counter, schedule and data move on) and counted. ``max_skipped`` in a row
        stop the run (``diverged_at``). The decision is the step's one host sync (one all-reduce first
        when distributed)."""
        loss_ok = self._cycle_finite if self._cycle_finite is not None else torch.ones((), dtype=torch.bool)
        loss_ok = loss_ok.to(self.device)
        bad_flag = ~(loss_ok & self._grads_finite())
        if self.trainer.world_size > 1:  # all ranks decide together
            bad_flag = max_over_ranks(bad_flag.float().reshape(1))[0] > 0
        bad = bool(bad_flag)
        if bad:  # what this rank found (a second read, on the rare bad step only)
            self.nonfinite = "gradient norm" if bool(loss_ok) else "loss"
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
            if self.clip:
                self.clip_gradients(opt, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt.step()
        self.lr_schedulers().step()
        if self.consecutive_skips >= self.max_skipped and self.diverged_at is None:
            self.diverged_at = self.trainer.global_step
            self.trainer.should_stop = True

    # -- exact resume: the counters and every RNG, per rank -----------------------------------
    def on_train_start(self):
        self.micro = self.trainer.global_step * self.accumulate

    def on_train_end(self):
        totals = self.data_skips.totals(self.device)
        self.data_skips.report(totals, final=True)
        if self.logger is not None:  # the final counts, whatever the logging interval (rank 0 writes)
            self.logger.log_metrics({f"data/skipped/{r}": float(n) for r, n in totals.items()},
                                    step=self.trainer.global_step)

    def on_train_batch_start(self, batch, batch_idx):
        self.data_skips.add(getattr(batch, "skipped", None) or {})
        # before the DDP wrapper's forward: the reducer stays out of every backward of the step
        grad_sync.keep_reducer_out(self.trainer.strategy)
        if self._pending_rng is not None:  # after the dataloader and anything else drew at startup
            set_rng_states(self._pending_rng)
            self._pending_rng = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["embedkit"] = {"rng": all_objects(rng_states()), "skipped_steps": self.skipped_steps,
                                  "consecutive_skips": self.consecutive_skips,
                                  "data_skipped": self.data_skips.state(self.device)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("embedkit")
        if not saved:
            return
        self.skipped_steps = saved["skipped_steps"]
        self.consecutive_skips = saved["consecutive_skips"]
        self.data_skips.load(saved.get("data_skipped"))
        rank = rank_and_world()[0]
        if rank < len(saved["rng"]):
            self._pending_rng = saved["rng"][rank]

    def backward_batch(self, batch: TrainBatch, backward, scale: float = 1.0,
                       before_last_backward=None, min_passes: int = 0) -> LossOutput:
        """Encode a TrainBatch, compute the loss, backpropagate ``scale * loss`` (GradCache when a
        side spans several chunks). ``backward(tensor)`` runs one backward pass. Returns the loss.

        Chunks laid out by cost (``TrainBatch.*_restore``) are put back in batch order after
        encoding, before the loss, which pairs rows by position. ``min_passes``: run at least this
        many forward passes, padding with passes over this batch's smallest chunk whose embeddings
        the loss never sees (zero gradient): FSDP2 ranks with token budgets must run as many
        sharded forward and backward passes as each other (``agree_passes``).
        """
        nq, nc = len(batch.query_chunks), len(batch.candidate_chunks)
        B, K = batch.per_device_batch, batch.num_negatives
        teacher = self.teacher_of(batch)
        chunks = batch.query_chunks + batch.candidate_chunks
        real = nq + nc
        if min_passes > real:
            smallest = min(chunks, key=lambda c: c["input_ids"].numel() if "input_ids" in c else 0)
            chunks = chunks + [smallest] * (min_passes - real)

        def loss_of(embs: list[torch.Tensor]) -> LossOutput:
            q, c = torch.cat(embs[:nq]), torch.cat(embs[nq:real])
            if batch.query_restore is not None:
                q = q[batch.query_restore]
            if batch.candidate_restore is not None:
                c = c[batch.candidate_restore]
            n = c[B:].view(B, K, *c.shape[1:]) if K else None
            # the keys (and the teacher's rows) stay in batch order: the loss sees the candidates restored to it
            # teacher only when there is one: subclasses' compute_loss(q, p, n, candidate_keys) keep working
            return self.compute_loss(q, c[:B], n, batch.candidate_keys, **({"teacher": teacher} if teacher else {}))

        # each side in one forward pass: no cache, no extra forward (memory: both sides' activations);
        # padded passes need the cache (their zero gradients are backpropagated like any chunk's)
        use_cache = len(chunks) > 2
        return gradcache.cached_step(self.encode, chunks, loss_of, backward, scale=scale,
                                     before_last_backward=before_last_backward, use_cache=use_cache)

    def agree_passes(self, batch: TrainBatch) -> int:
        """The most forward passes any rank runs for its batch (one all-reduce)."""
        count = torch.tensor([len(batch.query_chunks) + len(batch.candidate_chunks)], device=self.device)
        return int(max_over_ranks(count).item())

    def configure_optimizers(self):
        optimizer = build_optimizer(self.parameters(), self.train_cfg)
        scheduler = build_scheduler(optimizer, self.train_cfg, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation: held-out queries ranked against every held-out candidate ----------------
    def validation_step(self, batch, batch_idx):
        roles, index, inputs = batch
        self._val.append((roles.cpu(), index.cpu(), self.encoder(inputs).cpu()))

    def on_validation_epoch_end(self):
        if not self._val:
            return
        roles = torch.cat([r for r, _, _ in self._val])
        index = torch.cat([i for _, i, _ in self._val])
        emb = torch.cat([e for _, _, e in self._val])
        self._val.clear()
        q = emb[roles == Role.QUERY][index[roles == Role.QUERY].argsort()]
        c = emb[roles == Role.CANDIDATE][index[roles == Role.CANDIDATE].argsort()]
        name, value = self.held_out_metric(similarity_for(q)(q, c))
        self.log(f"val/{name}", value, batch_size=len(q))

    def held_out_metric(self, scores: torch.Tensor) -> tuple[str, torch.Tensor | float]:
        """(name, value) of the held-out ranking ``scores [Q, C]`` (query i's answer is candidate i): the
        datamodule's ``held_out`` names it (``p@1`` without one) and, for a graded set, gives the qrels
        that ``graded_metric`` scores; else the fraction of queries whose best candidate is their own."""
        held = getattr(self.trainer.datamodule, "held_out", None) if self._trainer is not None else None
        if held is None or held.qrels is None:
            hits = scores.argmax(dim=1) == torch.arange(len(scores))
            return (held.metric if held is not None else "p@1"), hits.float().mean()
        if self.graded_metric is None:
            raise UserError(f"the held-out set has graded qrels ({held.metric}) but no graded_metric was set")
        return held.metric, self.graded_metric(scores, held.qrels)
