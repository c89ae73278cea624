"""GradCache benchmark: step time and peak memory against the global batch size, with and without the cache.

    python bench/gradcache.py                          # global batch 16, 64, 256, 1024; chunk 16
    python bench/gradcache.py --modes cached --threads 1          # scaling only (CPU: the tiny encoder)

Model size: on a GPU the defaults are a realistic encoder (``--dim 1024 --layers 8 --seq 256``), on
the CPU a tiny one (``--dim 128 --layers 2 --seq 128``); any of the three flags overrides.

The model is a stack of transformer encoder layers over ``--seq`` tokens: its activations grow with
the batch while its weights do not, so activations dominate memory, as in a VLM on images. Each
(global batch, mode) runs in its own subprocess, one warm-up step then ``--steps`` timed steps of
``gradcache.cached_step`` + SGD, with the InfoNCE loss (queries vs. candidates, 2 x G items).
Modes: ``cached`` (chunks of ``--chunk`` items through the cache) and ``uncached`` (one forward
pass with grad per side, what the module runs when each side fits in one chunk).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the peak resident set size
(``getrusage``) minus the resident size just before the first step (imports, weights and inputs
excluded), in a separate process whose large tensors are each mapped on their own
(``MALLOC_MMAP_THRESHOLD_``) so freed memory leaves the RSS. Prints a table and the ratios:
cached/uncached time at each global batch, and peak memory at the largest global batch over peak
memory at global batch = chunk size (uncached: both sides' activations at once; cached: one chunk).
Scaling (cached): step time per example at each global batch of at least 64 over that at the
smallest, at the fixed ``--chunk`` -- flat means the cache costs the same per example however large
the contrastive batch -- and peak memory at the largest over one chunk's (the cached step at
global batch = chunk).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def one_config(args) -> dict:
    """Runs in the child: time and peak memory of GradCache steps for one (global batch, chunk)."""
    import torch
    from torch import nn

    from embedkit.losses.infonce import InfoNCE
    from embedkit.training.gradcache import cached_step

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    layer = nn.TransformerEncoderLayer(args.dim, nhead=4, dim_feedforward=4 * args.dim, dropout=args.dropout,
                                       batch_first=True)
    encoder = nn.TransformerEncoder(layer, args.layers, enable_nested_tensor=False).to(device)
    loss_fn = InfoNCE(temperature=0.05).to(device)
    opt = torch.optim.SGD(encoder.parameters(), lr=1e-3)
    G, chunk = args.global_batch, args.chunk_size
    q = torch.randn(G, args.seq, args.dim, device=device)
    c = torch.randn(G, args.seq, args.dim, device=device)
    chunks = list(q.split(chunk)) + list(c.split(chunk))
    nq = len(q.split(chunk))

    def encode(x):
        return nn.functional.normalize(encoder(x)[:, -1], dim=-1)

    def loss_of(embs):
        return loss_fn(torch.cat(embs[:nq]), torch.cat(embs[nq:]))

    def step():
        opt.zero_grad(set_to_none=True)
        cached_step(encode, chunks, loss_of, lambda t: t.backward(), use_cache=args.cache)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    step()  # warm-up (allocator, grads)
    times = []
    for _ in range(args.steps if args.measure != "memory" else 0):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    return {"global_batch": G, "chunk_size": chunk, "mode": "cached" if args.cache else "uncached",
            "step_s": min(times) if times else None, "peak_mib": peak / 2**20, "device": device.type}


def report(by: dict, sizes: list[int], args) -> None:
    """The ratios: cached vs uncached, scaling per example, peak memory over one chunk."""
    print("\ncached / uncached at the same global batch (time; peak memory):")
    for G in args.sizes:
        a, b = by.get((G, "cached")), by.get((G, "uncached"))
        if a and b:
            print(f"  G={G:5d}: time x{a['step_s'] / b['step_s']:.2f}; peak memory x{a['peak_mib'] / b['peak_mib']:.2f}")
    top, small = max(sizes), min(args.chunk, min(sizes))
    big = by.get((top, "cached"))
    scaled = [G for G in sizes if G >= 64 and (G, "cached") in by]
    if scaled:
        base = by[scaled[0], "cached"]["step_s"] / scaled[0]
        print(f"\nscaling, cached, chunk {args.chunk}: step time per example (ms) and over G={scaled[0]}'s")
        for G in scaled:
            per = by[G, "cached"]["step_s"] / G
            print(f"  G={G:5d}: {per * 1e3:8.3f} ms/example  x{per / base:.2f}")
    for mode, what in (("uncached", "what global batch = chunk size runs: one pass per side"),
                       ("cached", "one chunk: the same passes, one chunk at a time")):
        ref = by.get((small, mode))
        if big and ref:
            print(f"peak memory, cached G={top} over {mode} G={small} ({what}): x{big['peak_mib'] / ref['peak_mib']:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--seq", type=int, default=None, help="tokens per item (GPU 256, CPU 128)")
    ap.add_argument("--dim", type=int, default=None, help="model width (GPU 1024, CPU 128)")
    ap.add_argument("--layers", type=int, default=None, help="encoder layers (GPU 8, CPU 2)")
    ap.add_argument("--modes", nargs="+", choices=["cached", "uncached"], default=["cached", "uncached"])
    ap.add_argument("--steps", type=int, default=2)
    # 0 by default, as in the backbones we train (Qwen2-VL's attention_dropout is 0.0): on a CPU,
    # drawing dropout masks costs more than the matmuls they mask (2/3 of a forward at dim 128) and
    # would make the extra forward look dearer than on a GPU. Exactness with dropout is a test.
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is present")
    ap.add_argument("--child", nargs=4, metavar=("GLOBAL", "CHUNK", "CACHE", "MEASURE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        G, chunk, cache, args.measure = args.child
        args.global_batch, args.chunk_size, args.cache = int(G), int(chunk), cache == "1"
        print(json.dumps(one_config(args)))
        return 0

    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    for key, (on_gpu, on_cpu) in {"seq": (256, 128), "dim": (1024, 128), "layers": (8, 2)}.items():
        if getattr(args, key) is None:
            setattr(args, key, on_gpu if gpu else on_cpu)
    passthrough = ["--seq", str(args.seq), "--dim", str(args.dim), "--layers", str(args.layers),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--dropout", str(args.dropout)] + (["--cpu"] if args.cpu else [])
    on_cpu = not gpu
    print(f"encoder: dim {args.dim}, {args.layers} layers, {args.seq} tokens; chunk {args.chunk}; "
          f"{'cpu' if on_cpu else 'cuda'}, threads {args.threads}, load {os.getloadavg()[0]:.2f}", flush=True)
    # CPU: time and memory in separate processes. For memory, every tensor of 64 KiB or more gets
    # its own mapping, returned to the system when freed, so the peak RSS follows live tensors and
    # not glibc's heap high-water mark; that makes allocation slow, so time runs with plain malloc.
    runs = [("time", {}), ("memory", {"MALLOC_MMAP_THRESHOLD_": "65536"})] if on_cpu else [("both", {})]

    def child(G: int, chunk: int, cache: bool, measure: str, env: dict) -> dict | None:
        out = subprocess.run([sys.executable, __file__, "--child", str(G), str(chunk), str(int(cache)), measure,
                              *passthrough], capture_output=True, text=True, env=dict(os.environ, **env))
        if out.returncode != 0:
            print(f"G={G} chunk={chunk} cache={cache}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return None
        return json.loads(out.stdout.strip().splitlines()[-1])

    by = {}
    sizes = sorted(set(args.sizes) | ({args.chunk} if "cached" in args.modes else set()))
    for G in sizes:
        for cache in [m == "cached" for m in args.modes]:
            chunk = min(args.chunk, G) if cache else G
            parts = [child(G, chunk, cache, measure, env) for measure, env in runs]
            if None in parts:
                continue
            row = dict(parts[0], peak_mib=parts[-1]["peak_mib"])  # time from the first run, memory from the last
            by[G, row["mode"]] = row
            print(f"G={G:5d} chunk={row['chunk_size']:5d} {row['mode']:8s} step {row['step_s']:8.3f} s   "
                  f"peak {row['peak_mib']:9.1f} MiB ({row['device']})", flush=True)

    report(by, sizes, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
