"""Video training on the CPU: does the loader keep up, and does a cached step's memory stay flat?

    PYTHONPATH=. python bench/video.py                  # both parts
    PYTHONPATH=. python bench/video.py --part memory --sizes 16 64
    PYTHONPATH=. python bench/video.py --part loader --workers 2 --steps 10

**memory**: one GradCache step of the demo's tiny Qwen2-VL (vision tower trainable, 56 px frames) on a
contrastive batch of G queries that are 8-frame videos against G captions, in chunks of ``--chunk``;
each G in its own process, peak resident memory minus the resident size just before the step (weights
and the processed batch excluded: they exist before the step), with every tensor of 64 KiB or more
mapped on its own (``MALLOC_MMAP_THRESHOLD_``) so freed memory leaves the RSS (as bench/gradcache.py).
Printed: peak per G and the ratio largest / smallest (target: flat within 1.25x, issue 28).

**loader** (``bench/data.py --recipe demo_video``): the demo_video recipe's clips as the training stream
reads them -- shards of PNG frames, decoded, sampled by the frame policy and processed into Qwen2-VL's
video patches by the real ``ShardStream`` + ``ChunkCollate`` in a DataLoader with 0 and ``--workers``
workers: video examples per second delivered. Against it, the model's consumption: the demo module's
optimizer steps on batches taken from the same loader beforehand, examples per second. Printed: both rates
and loader / model (target: above 1 with 2 workers, i.e. the loader is never the bottleneck).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.gradcache import peak_rss_bytes, rss_bytes

FRAMES, SIDE = 8, 56
RECIPE = ["recipe=demo", "model.backbone.freeze_vision=false", "data.train.num_workers=0"]


def _clip(i: int):
    from embedkit.data.video import frames_from_images
    from tests.helpers.images import speckled_image

    return frames_from_images([speckled_image(SIDE, SIDE, 1000 * i + f) for f in range(FRAMES)],
                              [f / 4 for f in range(FRAMES)])


def memory_child(G: int, chunk: int) -> dict:
    """Runs in the child: the peak memory of one cached step with G video queries."""
    import torch

    from embedkit.config.loader import compose
    from embedkit.data.batch import ChunkCollate
    from embedkit.data.schema import Example, Item
    from embedkit.training.module import EmbeddingModule

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = compose([*RECIPE, f"train.global_batch_size={G}", f"train.chunk_size={chunk}"])
    module = EmbeddingModule.from_config(cfg).train()
    examples = [Example(Item(text="what moves", video=_clip(i)), Item(text=f"caption {i}"), [], "v") for i in range(G)]
    batch = ChunkCollate(module.encoder.processor(), chunk, 0)(examples)
    base = rss_bytes()
    module.backward_batch(batch, lambda t: t.backward())
    return {"G": G, "chunk": chunk, "passes": len(batch.query_chunks) + len(batch.candidate_chunks),
            "peak_mib": (peak_rss_bytes() - base) / 2**20}


def memory(args) -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    rows = []
    for G in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(G), str(args.chunk)], capture_output=True,
                             text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"G={G}: failed\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"G={r['G']:4d} ({FRAMES}-frame videos, chunk {r['chunk']}, {r['passes']} passes): "
              f"peak {r['peak_mib']:7.1f} MiB", flush=True)
    print(f"memory ratio G={rows[-1]['G']} / G={rows[0]['G']}: {rows[-1]['peak_mib'] / rows[0]['peak_mib']:.2f}x "
          "(target <= 1.25)")


def loader(args) -> None:
    """bench/data.py on the demo_video recipe: the loader's rate with ``--workers`` against the model's."""
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data.py")
    subprocess.run([sys.executable, bench, "--recipe", "demo_video", "--steps", str(args.steps), "--workers", "0",
                    str(args.workers)], check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["memory", "loader", "both"], default="both")
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="loader batches timed per setting")
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(*args.child)))
        return 0
    t0 = time.perf_counter()
    print(f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    if args.part in ("memory", "both"):
        memory(args)
    if args.part in ("loader", "both"):
        loader(args)
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
