"""Is the loader fast enough? Loader samples/s with 0, 1 and 2 workers against the demo model's rate.

    PYTHONPATH=. python bench/data.py [--steps 20] [--recipe demo] [key=value ...]   (overrides go to the recipe)
    PYTHONPATH=. python bench/data.py --recipe demo_video        # video clips: decoded frames (bench/video.py)

The loader side iterates the real training DataLoader (shard reading, decoding, shuffling, mixing
and the backbone's processor per chunk, i.e. everything but the model). The model side times the
demo's optimizer step (encode queries and candidates, InfoNCE, backward, AdamW) on batches taken
from that loader beforehand, in the main process with the loader idle. A ratio above 1 means the
loader outruns the model: the step is compute-bound. Both rates are in examples per second.
On a CPU box the two share cores, so the ratio in a real run is lower than measured apart; torch
uses $OMP_NUM_THREADS threads (set it to the cores you own: oversubscribed cores slow the model ~20x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def loader_rate(cfg, data, workers: int, steps: int) -> float:
    cfg["data"]["train"]["num_workers"] = workers
    it = iter(data.train_dataloader())
    next(it)  # worker start-up and the first shuffle-buffer fill are not throughput
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    elapsed = time.perf_counter() - start
    del it
    return steps * batch.per_device_batch / elapsed


def model_rate(module, batches) -> float:
    import torch

    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step(batch):
        module.backward_batch(batch, lambda loss: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches[1:]:
        step(b)
    return sum(b.per_device_batch for b in batches[1:]) / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="batches timed per setting")
    p.add_argument("--recipe", default="demo", help="a demo recipe: demo, demo_video, demo_docs")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts to time")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.global_batch_size=32")
    ns = p.parse_args()
    os.environ.setdefault("EMBEDKIT_CACHE", str(Path(tempfile.gettempdir()) / "embedkit-bench"))
    import torch

    from embedkit.config.loader import compose
    from embedkit.data.datamodule import EmbeddingDataModule, resolve_shards
    from embedkit.training.module import EmbeddingModule

    cfg = compose([f"recipe={ns.recipe}", "data.demo.train_size=2000", "data.val.enabled=false", *ns.overrides])
    module = EmbeddingModule.from_config(cfg)
    train, val = resolve_shards(cfg["data"], log=lambda m: print(m, flush=True))
    gbs = cfg["train"]["global_batch_size"]
    data = EmbeddingDataModule(cfg["data"], module.encoder.processor(), train, val, seed=cfg["seed"],
                               global_batch_size=gbs, chunk_size=cfg["train"]["chunk_size"],
                               chunk_tokens=cfg["train"]["chunk_tokens"], sort_chunks=cfg["train"]["sort_chunks"])
    print(f"{ns.recipe} model, global_batch_size={gbs}, chunk_size={cfg['train']['chunk_size']}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")

    cfg["data"]["train"]["num_workers"] = 0
    it = iter(data.train_dataloader())
    batches = [next(it) for _ in range(max(3, ns.steps // 2))]
    model = model_rate(module, batches)
    print(f"model consumes            {model:8.1f} examples/s")
    for workers in ns.workers:
        rate = loader_rate(cfg, data, workers, ns.steps)
        print(f"loader, {workers} workers          {rate:8.1f} examples/s   ratio loader/model {rate / model:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
