"""One GradCache step of the real EmbeddingModule on 2 CPU processes (gloo), against the full batch.

    python tests/helpers/scripts/gradcache_dist.py {ddp|fsdp2|fsdp2_tokens|ddp_video|fsdp2_video|ddp_video25|ddp_video3} OUT.json

Lightning launches the second process itself (it re-runs this script). Each rank trains ONE SGD
step on its half of a global batch of 8 examples (1 hard negative each), in chunks of 2, with
dropout on and gradient clipping on. Rank r seeds its dropout with 1000 + r just before the step.
Rank 0 then builds the same model again and computes, single-process, the full-batch loss with
every rank's chunks encoded with grad in ONE graph (rank r's chunks under seed 1000 + r, in the
order GradCache encodes them: the same dropout masks). It writes the largest differences between
the distributed step's synced gradients / updated weights and the reference's to OUT.json; the
pytest side asserts on them.

``fsdp2_tokens``: the batches come from the real ``ChunkCollate`` with a token budget and cost
sorting, over variable-length items, so rank 0 (long items) runs more forward passes than rank 1
(short ones): the ranks agree on the count and rank 1 pads with passes of zero gradient.

``ddp_video`` / ``fsdp2_video``: the backbone is a tiny Qwen2-VL with its vision tower trainable, and the
batches are the real ``ChunkCollate`` over video (3 and 4 frames), several-image and text items on rank 0
and text only on rank 1: rank 1's chunks carry no pixels, so its tower runs on the dummy input
(``_common.keep_vision_in_graph``) and the ranks' collectives match (issue 28). ``ddp_video25``: the same
on a tiny Qwen2.5-VL (``qwen2_5_vl``: window attention, host position ids; issue 29); ``ddp_video3`` on a
tiny Qwen3-VL (``qwen3_vl``: deepstack, timestamps in the text, host position ids).
"""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
from torch import nn

from embedkit.backbones.base import Backbone, BackboneOutput
from embedkit.config import registry, schema
from embedkit.data.batch import ChunkCollate, TrainBatch, chunked
from embedkit.data.schema import Example, Item
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
        return BackboneOutput(h, inputs.get("attention_mask", torch.ones(h.shape[:2], dtype=torch.long)))


VIDEO_BACKBONE = {"name": "qwen2_vl", "tiny": True, "freeze_vision": False, "min_pixels": 28 * 28,
                  "max_pixels": 56 * 56}
#: mode -> its video backbone
VIDEO_MODES = {"ddp_video": VIDEO_BACKBONE, "fsdp2_video": VIDEO_BACKBONE,
               "ddp_video25": {**VIDEO_BACKBONE, "name": "qwen2_5_vl"},
               "ddp_video3": {**VIDEO_BACKBONE, "name": "qwen3_vl", "min_pixels": 32 * 32, "max_pixels": 64 * 64}}


def config(mode: str = "ddp") -> dict:
    backbone = VIDEO_MODES.get(mode, {"name": "probe"})
    return schema.validate({
        "seed": 0, "model": {"backbone": backbone, "pooling": "last_token"},
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


class TokenProcessor:
    """Items whose text is a list of word numbers -> {"x": [n, longest, F], "attention_mask"}, right-padded."""

    table = torch.randn(10, F, generator=torch.Generator().manual_seed(3))

    def __call__(self, items):
        rows = [[int(w) for w in it.text.split()] for it in items]
        longest = max(len(r) for r in rows)
        x = torch.zeros(len(rows), longest, F)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = self.table[r]
            mask[i, : len(r)] = 1
        return {"x": x, "attention_mask": mask}

    def num_tokens(self, item):
        return len(item.text.split())


#: words per item of each example (query, positive, negative); rank 0 holds the long ones
LENGTHS = [(6, 1, 5), (2, 6, 1), (5, 5, 2), (1, 3, 6), (1, 2, 1), (2, 1, 1), (1, 1, 2), (2, 2, 1)]
BUDGET = 8  # padded tokens per forward pass


def token_batch(rank: int) -> TrainBatch:
    def item(n, salt):
        return Item(text=" ".join(str((n * 7 + salt + j) % 10) for j in range(n)))

    b = B // WORLD
    examples = [Example(query=item(q, i), positive=item(p, i + 1), negatives=[item(n, i + 2)], task="t")
                for i, (q, p, n) in enumerate(LENGTHS)][rank * b: (rank + 1) * b]
    return ChunkCollate(TokenProcessor(), CHUNK, K, chunk_tokens=BUDGET, sort=True)(examples)


def _frames(n: int, seed: int):
    from embedkit.data.video import frames_from_images
    from tests.helpers.images import speckled_image

    return frames_from_images([speckled_image(56, 28 + 28 * (seed % 2), seed + i) for i in range(n)])


def _images(k: int, seed: int):
    from tests.helpers.images import speckled_image

    return [speckled_image(28 + 28 * (i % 2), 56, seed + i) for i in range(k)]


def video_examples(rank: int) -> list[Example]:
    """Rank 0: videos, several images and text; rank 1: text only (no pixels in any of its chunks)."""
    if rank == 1:
        return [Example(Item(text=f"words {i} and more"), Item(text=f"doc {i}"), [Item(text=f"other {i}")], "t")
                for i in range(B // WORLD)]
    q = [Item(text="<|video_1|> what moves", video=_frames(3, 0)), Item(text="pair", images=_images(2, 10)),
         Item(text="find the dog"), Item(text="a clip", video=_frames(4, 20))]
    p = [Item(text="a square", images=_images(1, 30)), Item(text="two photos"),
         Item(text="dog", video=_frames(3, 40)), Item(text="<|image_2|> then <|image_1|>", images=_images(2, 50))]
    n = [Item(text="nothing"), Item(text="x", video=_frames(3, 60)), Item(text="y", images=_images(3, 70)),
         Item(text="z")]
    return [Example(*parts, "t") for parts in zip(q, p, [[x] for x in n])]


_PROCESSOR: dict = {}


def video_batch(rank: int, mode: str) -> TrainBatch:
    if mode not in _PROCESSOR:
        backbone = VIDEO_MODES[mode]
        settings = {k: v for k, v in backbone.items() if k != "name"}
        factory = registry.get("backbone", backbone["name"]).factory
        _PROCESSOR[mode] = factory(seed=0, **settings).make_processor()
    return ChunkCollate(_PROCESSOR[mode], CHUNK, K)(video_examples(rank))


def with_dropout(module: EmbeddingModule) -> EmbeddingModule:
    """The tiny Qwen2-VL's attention dropout on (it is built with 0), so the replay is exercised."""
    for m in module.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.2
    return module


def rank_batch(rank: int, mode: str) -> TrainBatch:
    if mode == "fsdp2_tokens":
        return token_batch(rank)
    if mode in VIDEO_MODES:
        return video_batch(rank, mode)
    qc, cc = rank_chunks(rank)
    return TrainBatch(qc, cc, B // WORLD, K, ["t"] * (B // WORLD))


class OneBatch(torch.utils.data.Dataset):
    def __init__(self, rank, mode):
        self.rank, self.mode = rank, mode

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return rank_batch(self.rank, self.mode)


class Probed(EmbeddingModule):
    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        torch.manual_seed(1000 + self.global_rank)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(OneBatch(self.global_rank, MODE), batch_size=1, collate_fn=lambda x: x[0])

    def _sync_gradients(self):
        super()._sync_gradients()
        self.synced = {n: full(p.grad).clone() for n, p in self.named_parameters() if p.grad is not None}


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def reference(cfg, mode):
    """Single process, full batch: every rank's chunks with grad in one graph, the same dropout draws."""
    module = with_dropout(EmbeddingModule.from_config(cfg))
    init = {n: p.detach().clone() for n, p in module.named_parameters()}
    qs, cs = [], []
    for rank in range(WORLD):
        batch = rank_batch(rank, mode)
        qc, cc = batch.query_chunks, batch.candidate_chunks
        torch.manual_seed(1000 + rank)
        embs = [module.encode(c) for c in qc + cc]
        q, c = torch.cat(embs[: len(qc)]), torch.cat(embs[len(qc):])
        qs.append(q if batch.query_restore is None else q[batch.query_restore])
        cs.append(c if batch.candidate_restore is None else c[batch.candidate_restore])
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


MODE = "ddp"


def main(mode: str, out_path: str) -> None:
    global MODE
    MODE = mode
    torch.set_num_threads(1)
    cfg = config(mode)
    if mode.startswith("ddp"):
        strategy = "ddp"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    module = with_dropout(Probed.from_config(cfg))
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
    loss, ref_grads, ref_weights, norm = reference(cfg, mode)
    from embedkit.training.grad_sync import fsdp2_roots

    passes = [len(b.query_chunks) + len(b.candidate_chunks) for b in (rank_batch(r, mode) for r in range(WORLD))]
    result = {"mode": mode, "grad_norm": norm, "passes": passes, "sharded": bool(fsdp2_roots(module)), "params": sorted(ref_grads),
              "missing": sorted(set(ref_grads) - set(synced))}
    result["grad_diff"] = max((synced[n] - g).abs().max().item() for n, g in ref_grads.items() if n in synced)
    result["weight_diff"] = max((weights[n] - w).abs().max().item() for n, w in ref_weights.items())
    result["rank_diff"] = max((theirs[1]["grads"][n] - synced[n]).abs().max().item() for n in synced)
    # dropout is on: the reference under other seeds gives another gradient
    torch.manual_seed(0)
    other = with_dropout(EmbeddingModule.from_config(cfg))
    qc = rank_batch(0, mode).query_chunks
    embs = [other.encode(c) for c in qc]
    result["dropout_active"] = not torch.allclose(embs[0], other.encode(qc[0]))
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
