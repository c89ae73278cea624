"""EmbeddingModule: backbone + pooling head + loss, trained with GradCache under manual optimization.

A training batch (``TrainBatch``) arrives already split into processed chunks. The module encodes
chunks into embeddings, the loss sees embeddings only, and ``gradcache.cached_step`` backpropagates
(through the cache when there is more than one chunk). The module owns gradient clipping, the LR
schedule and the optimizer step (manual optimization), so the same code serves one chunk or many.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from embedkit.config import registry
from embedkit.data.stream import TrainBatch
from embedkit.distributed import distributed_loss
from embedkit.losses.base import LossOutput
from embedkit.training import grad_sync, gradcache
from embedkit.training.optim import build_optimizer, build_scheduler


class EmbeddingModule(L.LightningModule):
    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters({"config": config}, logger=False)
        self.cfg = config
        model = config["model"]
        self.backbone = registry.build("backbone", model["backbone"], seed=config["seed"])
        if model["lora"]["enabled"]:
            from embedkit.backbones.lora import apply_lora

            apply_lora(self.backbone, model["lora"])
        self.pooling = registry.build("pooling", model["pooling"], hidden_size=self.backbone.hidden_size,
                                      num_layers=self.backbone.num_layers)
        # embedding_dim: known only here (Matryoshka rejects dims larger than it, naming loss.dims)
        self.loss_fn = registry.build("loss", config["loss"], embedding_dim=self.backbone.hidden_size)
        self.automatic_optimization = False
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.val_results: dict[str, float] = {}

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, inputs: dict) -> torch.Tensor:
        """Processed chunk -> embeddings [n, D] (L2-normalised unless model.normalize=false)."""
        out = self.backbone(inputs, output_all_layers=self.pooling.needs_all_layers)
        emb = self.pooling(out.hidden, out.mask, out.all_layers).float()
        return F.normalize(emb, dim=-1) if self.cfg["model"]["normalize"] else emb

    def compute_loss(self, q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None) -> LossOutput:
        # cross-device negatives when distributed (the plain loss otherwise); DDP's gradient
        # averaging then gives the full-batch gradient: see embedkit/distributed/loss.py
        return distributed_loss(self.loss_fn, q, p, n)

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
        fully_shard(self.backbone, mesh=dp_mesh)
        if any(p.requires_grad for p in self.pooling.parameters()):
            fully_shard(self.pooling, mesh=dp_mesh)

    def on_train_batch_start(self, batch, batch_idx):
        # before the DDP wrapper's forward: the reducer stays out of every backward of the step
        grad_sync.keep_reducer_out(self.trainer.strategy)

    def _sync_gradients(self) -> None:
        """Once per optimizer step: average over ranks every gradient no data-parallel engine reduced."""
        from torch.distributed.tensor import DTensor

        params = [p for p in self.parameters() if p.requires_grad and not isinstance(p, DTensor)]
        grad_sync.average_gradients(params)

    def training_step(self, batch: TrainBatch, batch_idx: int):
        opt = self.optimizers()
        accumulate = self.cfg["train"]["accumulate_steps"]
        if batch_idx % accumulate == 0:
            opt.zero_grad(set_to_none=True)
        steps_now = (batch_idx + 1) % accumulate == 0  # the last micro-batch of an optimizer step
        sharded = bool(grad_sync.fsdp2_roots(self))
        if sharded:  # FSDP2: accumulate unsharded grads; reduce-scatter on the step's last backward
            grad_sync.set_fsdp_sync(self, False)

        def before_last_backward():
            if sharded and steps_now:
                grad_sync.set_fsdp_sync(self, True)

        out = self.backward_batch(batch, self.manual_backward, scale=1.0 / accumulate,
                                  before_last_backward=before_last_backward)
        if steps_now:
            self._sync_gradients()
            clip = self.cfg["train"]["clip_grad_norm"]
            if clip:
                self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            opt.step()
            self.lr_schedulers().step()
        # distributed, each rank's loss is over its own rows: sync_dist reports the full-batch mean
        B = batch.batch_size
        self.log("train/loss", out.loss, prog_bar=True, batch_size=B, sync_dist=True)
        self.log("train/lr", opt.param_groups[0]["lr"], batch_size=B)
        for name, value in out.parts.items():
            self.log(f"train/loss/{name}", value, batch_size=B, sync_dist=True)
        return out.loss

    def backward_batch(self, batch: TrainBatch, backward, scale: float = 1.0,
                       before_last_backward=None) -> LossOutput:
        """Encode a TrainBatch, compute the loss, backpropagate ``scale * loss`` (GradCache when a
        side spans several chunks). ``backward(tensor)`` runs one backward pass. Returns the loss."""
        nq = len(batch.query_chunks)
        B, K = batch.batch_size, batch.num_negatives

        def loss_of(embs: list[torch.Tensor]) -> LossOutput:
            q, c = torch.cat(embs[:nq]), torch.cat(embs[nq:])
            n = c[B:].view(B, K, -1) if K else None
            return self.compute_loss(q, c[:B], n)

        # each side in one forward pass: no cache, no extra forward (memory: both sides' activations)
        use_cache = nq > 1 or len(batch.candidate_chunks) > 1
        return gradcache.cached_step(self.encode, batch.query_chunks + batch.candidate_chunks, loss_of,
                                     backward, scale=scale, before_last_backward=before_last_backward,
                                     use_cache=use_cache)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.parameters(), self.cfg["train"])
        scheduler = build_scheduler(optimizer, self.cfg["train"], self.cfg["trainer"]["max_steps"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def encode_items(self, items) -> torch.Tensor:
        """Raw ``Item``s -> embeddings (processing in this process: for evaluation, not training)."""
        if not hasattr(self, "_processor"):
            self._processor = self.backbone.make_processor()
        inputs = self._processor(items)
        return self.encode({k: v.to(self.device) for k, v in inputs.items()})

    # -- validation: held-out queries ranked against every held-out candidate ----------------
    def validation_step(self, batch, batch_idx):
        roles, index, inputs = batch
        self._val.append((roles.cpu(), index.cpu(), self.encode(inputs).cpu()))

    def on_validation_epoch_end(self):
        if not self._val:
            return
        roles = torch.cat([r for r, _, _ in self._val])
        index = torch.cat([i for _, i, _ in self._val])
        emb = torch.cat([e for _, _, e in self._val])
        self._val.clear()
        q = emb[roles == 0][index[roles == 0].argsort()]
        c = emb[roles == 1][index[roles == 1].argsort()]
        hits = (q @ c.T).argmax(dim=1) == torch.arange(len(q))
        self.val_results = {"val/p@1": hits.float().mean().item(), "num_queries": len(q)}
        self.log("val/p@1", hits.float().mean(), batch_size=len(q))
        self._validate_on_eval_subset()

    def _validate_on_eval_subset(self):
        """``val/<dataset>/p@1`` on the first ``data.eval.val_rows`` rows of each MMEB eval dataset."""
        ev = self.cfg["data"]["eval"]
        if not ev["root"] or ev["val_rows"] <= 0:
            return
        from embedkit.eval.mmeb import validation_metrics

        metrics = validation_metrics(self.encode_items, ev["root"], ev["datasets"], max_rows=ev["val_rows"],
                                     batch_size=self.cfg["train"]["chunk_size"], prefix="val")
        metrics["val/mmeb/p@1"] = metrics.pop("val/p@1")  # the held-out set above owns val/p@1
        for name, value in metrics.items():
            self.log(name, value)
        self.val_results.update(metrics)
