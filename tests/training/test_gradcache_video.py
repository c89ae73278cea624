"""GradCache over videos and several images per item (issue 28): the real EmbeddingModule (tiny Qwen2-VL,
vision tower trainable) trained on queries that are videos (7 and 8 frames), 3-image items and text,
against documents that are text, images and videos. Chunks of 2 equal the full batch in one forward per
side, and with attention dropout on the cache equals one graph over the same chunks: the loss and every
trainable gradient to 1e-5 (float32). The first query chunk is text only: the tower runs on its dummy
input there (``Qwen2VLBackbone._vision_dummy``).

Under 2-process DDP (gloo; this file run as a script, one launch): rank 0 encodes videos and images,
rank 1 text only; with the dummy pass rank 1's tower gradients are zeros, DDP reduces every bucket (no
hang, no unused-parameter error) and the averaged gradients equal the single-process ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embedkit.config.loader import compose
from embedkit.data.batch import ChunkCollate
from embedkit.data.schema import Example, Item
from embedkit.data.video import Frames
from embedkit.training.gradcache import cached_step
from embedkit.training.module import EmbeddingModule
from tests.helpers.cli import SMALL_DEMO
from tests.helpers.images import speckled_image

B, CHUNK = 8, 2


def _video(n: int, seed: int, w: int = 56, h: int = 84) -> Frames:
    return Frames([speckled_image(w, h, seed + i) for i in range(n)], None, list(range(n)), n)


def _images(k: int, seed: int):
    return [speckled_image(56 + 28 * (i % 2), 56, seed + i) for i in range(k)]


def examples() -> list[Example]:
    queries = [
        Item(text="find the red dog"), Item(text="a cat on the left"),
        Item(text="what happens in <|video_1|> this video", video=_video(7, 0)),
        Item(text="<|image_2|> compare <|image_1|> these <|image_3|>", images=_images(3, 10)),
        Item(text="the car", video=_video(8, 20, 84, 56)),
        Item(text="two pictures", images=_images(2, 30)),
        Item(text="a man", video=_video(3, 40)),
        Item(text="the woman", images=_images(1, 50)),
    ]
    positives = [
        Item(text="a red dog", images=_images(1, 60)), Item(text="cat", video=_video(4, 70)),
        Item(text="people walking"), Item(text="three photos"),
        Item(text="a car clip", video=_video(5, 80)), Item(text="pair", images=_images(2, 90)),
        Item(text="a man"), Item(text="a woman", images=_images(3, 100)),
    ]
    return [Example(q, p, [], task="video") for q, p in zip(queries, positives)]


@pytest.fixture(scope="module")
def module():
    cfg = compose(["recipe=demo", *SMALL_DEMO, "model.backbone.freeze_vision=false"])
    return EmbeddingModule.from_config(cfg)


def _grads(module):
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def _check(loss, grads, ref_loss, ref, module):
    assert grads.keys() == ref.keys() and len(grads) == sum(p.requires_grad for p in module.parameters())
    assert any(n.startswith("encoder.backbone.model.visual.") or ".visual." in n for n in ref)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_chunked_step_over_videos_and_images_equals_the_full_batch(module):
    module.eval()  # no dropout: the two layouts are comparable
    processor = module.encoder.processor()
    results = {}
    for chunk in (B, CHUNK):
        batch = ChunkCollate(processor, chunk, 0)(examples())
        assert len(batch.query_chunks) == B // chunk
        out = module.backward_batch(batch, lambda t: t.backward())
        results[chunk] = (out.loss.detach(), _grads(module))
    first = ChunkCollate(processor, CHUNK, 0)(examples()).query_chunks[0]
    assert "pixel_values" not in first and "pixel_values_videos" not in first  # the dummy path ran
    visual = {n: g for n, g in results[B][1].items() if ".visual." in n}
    assert visual and any(g.abs().sum() > 0 for g in visual.values())
    _check(*results[CHUNK], *results[B], module)


def test_cache_equals_one_graph_with_dropout_on(module):
    module.train()
    dropped = [m for m in module.modules() if hasattr(m, "attention_dropout")]
    for m in dropped:
        m.attention_dropout = 0.2
    try:
        processor = module.encoder.processor()
        exs = examples()
        chunks = [processor([e.query for e in exs[i:i + CHUNK]]) for i in range(0, B, CHUNK)]
        chunks += [processor([e.positive for e in exs[i:i + CHUNK]]) for i in range(0, B, CHUNK)]
        nq = B // CHUNK

        def loss_of(embs):
            return module.compute_loss(torch.cat(embs[:nq]), torch.cat(embs[nq:]), None)

        torch.manual_seed(0)
        loss = cached_step(module.encode, chunks, loss_of, lambda t: t.backward()).loss
        grads = _grads(module)
        torch.manual_seed(0)
        ref = loss_of([module.encode(c) for c in chunks])
        ref.loss.backward()
        _check(loss.detach(), grads, ref.loss.detach(), _grads(module), module)
    finally:
        for m in dropped:
            m.attention_dropout = 0.0


ROOT = Path(__file__).resolve().parents[2]
DDP_ITEMS = {0: lambda: [Item(text="a clip <|video_1|>", video=_video(3, 5)), Item(text="x", images=_images(2, 7))],
             1: lambda: [Item(text="find the red dog"), Item(text="only words")]}


def _pooled_loss(out):
    """The last real token's squared norm, averaged over the chunk."""
    last = out.mask.sum(1) - 1
    return out.hidden[torch.arange(len(last)), last].pow(2).mean()


def _ddp_worker(rank: int, port: int, out_path: str) -> None:
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from embedkit.backbones.qwen2_vl import Qwen2VLBackbone

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # a missing collective fails, not hangs
    pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56, freeze_vision=False)
    backbone = Qwen2VLBackbone(seed=0, tiny=True, **pixels).train()
    ddp = DistributedDataParallel(backbone)
    for _ in range(2):  # a second step: DDP raises there if the first left a bucket unreduced
        backbone.zero_grad(set_to_none=True)
        _pooled_loss(ddp(backbone.make_processor()(DDP_ITEMS[rank]()))).backward()
    grads = {n: p.grad for n, p in backbone.named_parameters() if p.requires_grad}
    if rank == 0:
        ref = Qwen2VLBackbone(seed=0, tiny=True, **pixels).train()
        sum(_pooled_loss(ref(ref.make_processor()(DDP_ITEMS[r]()))) / 2 for r in (0, 1)).backward()
        named = dict(ref.named_parameters())
        diff = max((grads[n] - named[n].grad).abs().max().item() for n in grads)
        tower = [n for n in grads if n.startswith("model.visual.")]
        Path(out_path).write_text(json.dumps({"max_diff": diff, "none": [n for n in grads if grads[n] is None],
                                              "tower": len(tower),
                                              "tower_scale": max(named[n].grad.abs().max().item() for n in tower)}))
    dist.destroy_process_group()


def test_ddp_rank_without_pixels_matches_single_process(tmp_path):
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["none"] == [] and r["tower"] > 0 and r["tower_scale"] > 0, r
    assert r["max_diff"] < 1e-5, r


if __name__ == "__main__":
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(free, sys.argv[1]), nprocs=2)
