"""One GradCache step of the real EmbeddingModule on 2 CPU processes (gloo), against the full batch.

    python tests/scripts/gradcache_dist.py {ddp|fsdp2} OUT.json

Lightning launches the second process itself (it re-runs this script). Each rank trains ONE SGD
step on its half of a global batch of 8 examples (1 hard negative each), in chunks of 2, with
dropout on and gradient clipping on. Rank r seeds its dropout with 1000 + r just before the step.
Rank 0 then builds the same model again and computes, single-process, the full-batch loss with
every rank's chunks encoded with grad in ONE graph (rank r's chunks under seed 1000 + r, in the
order GradCache encodes them: the same dropout masks). It writes the largest differences between
the distributed step's synced gradients / updated weights and the reference's to OUT.json; the
pytest side asserts on them.
"""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
from torch import nn

from embedkit.backbones.base import Backbone, BackboneOutput
from embedkit.config import registry, schema
from embedkit.data.stream import TrainBatch, chunked
from embedkit.training.module import EmbeddingModule

WORLD, B, K, CHUNK, T, F, H = 2, 8, 1, 2, 3, 6, 16
LR, CLIP = 0.5, 0.05  # CLIP is below the gradient norm: clipping really rescales


@registry.register("backbone", "probe")
class Probe(Backbone):
    """A tiny token encoder with dropout: inputs {"x": [n, T, F]} -> hidden [n, T, H]."""

    def __init__(self, seed: int, dropout: float = 0.3):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden_size, self.num_layers = H, 1
        self.inp, self.drop, self.out = nn.Linear(F, H), nn.Dropout(dropout), nn.Linear(H, H)

    def forward(self, inputs, output_all_layers=False):
        h = self.out(torch.tanh(self.drop(self.inp(inputs["x"]))))
        return BackboneOutput(h, torch.ones(h.shape[:2], dtype=torch.long))


def config() -> dict:
    return schema.validate({
        "seed": 0, "model": {"backbone": {"name": "probe"}, "pooling": "last_token"},
        "loss": {"name": "infonce", "temperature": 0.1, "learnable_temperature": True},
        "train": {"global_batch_size": B, "chunk_size": CHUNK, "optimizer": "sgd", "lr": LR, "warmup": 0.0,
                  "clip_grad_norm": CLIP},
        "trainer": {"max_steps": 1},
    })


def global_batch():
    g = torch.Generator().manual_seed(7)
    q, p, n = (torch.randn(B, T, F, generator=g) for _ in range(3))
    return q, p + 0.3 * q, n


def rank_chunks(rank: int) -> tuple[list[dict], list[dict]]:
    q, p, n = global_batch()
    b = B // WORLD
    rows = slice(rank * b, (rank + 1) * b)
    cands = list(p[rows]) + list(n[rows])  # positives, then the negatives (K=1, example-major)
    return ([{"x": torch.stack(c)} for c in chunked(list(q[rows]), CHUNK)],
            [{"x": torch.stack(c)} for c in chunked(cands, CHUNK)])


class OneBatch(torch.utils.data.Dataset):
    def __init__(self, rank):
        self.rank = rank

    def __len__(self):
        return 1

    def __getitem__(self, i):
        qc, cc = rank_chunks(self.rank)
        return TrainBatch(qc, cc, B // WORLD, K, ["t"] * (B // WORLD))


class Probed(EmbeddingModule):
    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        torch.manual_seed(1000 + self.global_rank)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(OneBatch(self.global_rank), batch_size=1, collate_fn=lambda x: x[0])

    def _sync_gradients(self):
        super()._sync_gradients()
        self.synced = {n: full(p.grad).clone() for n, p in self.named_parameters() if p.grad is not None}


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def reference(cfg):
    """Single process, full batch: every rank's chunks with grad in one graph, the same dropout draws."""
    module = EmbeddingModule.from_config(cfg)
    init = {n: p.detach().clone() for n, p in module.named_parameters()}
    qs, cs = [], []
    for rank in range(WORLD):
        qc, cc = rank_chunks(rank)
        torch.manual_seed(1000 + rank)
        embs = [module.encode(c) for c in qc + cc]
        qs.append(torch.cat(embs[: len(qc)]))
        cs.append(torch.cat(embs[len(qc):]))
    b = B // WORLD
    Q = torch.cat(qs)
    P = torch.cat([c[:b] for c in cs])
    N = torch.cat([c[b:].view(b, K, -1) for c in cs])
    out = module.loss_fn(Q, P, N)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
    scale = min(1.0, CLIP / (norm.item() + 1e-6))
    weights = {n: init[n] - LR * scale * g for n, g in grads.items()}
    return out.loss.item(), grads, weights, norm.item()


def main(mode: str, out_path: str) -> None:
    torch.set_num_threads(1)
    cfg = config()
    if mode == "ddp":
        strategy = "ddp"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    module = Probed.from_config(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module)
    synced = module.synced
    weights = {n: full(p).clone() for n, p in module.named_parameters()}  # collective under FSDP2
    # every rank must end with the same gradients and weights: gather rank 1's to rank 0
    import torch.distributed as dist

    theirs = [None] * WORLD
    dist.all_gather_object(theirs, {"grads": synced, "weights": weights})
    if trainer.global_rank != 0:
        return
    loss, ref_grads, ref_weights, norm = reference(cfg)
    from embedkit.training.grad_sync import fsdp2_roots

    result = {"mode": mode, "grad_norm": norm, "sharded": bool(fsdp2_roots(module)), "params": sorted(ref_grads),
              "missing": sorted(set(ref_grads) - set(synced))}
    result["grad_diff"] = max((synced[n] - g).abs().max().item() for n, g in ref_grads.items() if n in synced)
    result["weight_diff"] = max((weights[n] - w).abs().max().item() for n, w in ref_weights.items())
    result["rank_diff"] = max((theirs[1]["grads"][n] - synced[n]).abs().max().item() for n in synced)
    # dropout is on: the reference under other seeds gives another gradient
    torch.manual_seed(0)
    other = EmbeddingModule.from_config(cfg)
    qc, cc = rank_chunks(0)
    embs = [other.encode(c) for c in qc + cc]
    result["dropout_active"] = not torch.allclose(embs[0], other.encode(qc[0]))
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
