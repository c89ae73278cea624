"""GradCache benchmark: step time and peak memory against the global batch size, with and without the cache.

    python bench/gradcache.py                          # global batch 16, 64, 256, 1024; chunk 16
    python bench/gradcache.py --sizes 16 64 --seq 64 --dim 128 --layers 2   # small, for a CPU

The model is a stack of transformer encoder layers over ``--seq`` tokens: its activations grow with
the batch while its weights do not, so activations dominate memory, as in a VLM on images. Each
(global batch, mode) runs in its own subprocess, one warm-up step then ``--steps`` timed steps of
``gradcache.cached_step`` + SGD, with the InfoNCE loss (queries vs. candidates, 2 x G items).
Modes: ``cached`` (chunks of ``--chunk`` items) and ``uncached`` (one chunk: the whole batch).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the subprocess's peak resident
set size (``getrusage``) minus its resident size just before the first step (imports, weights and
inputs excluded). Prints a table and the ratios: cached/uncached time at each global batch, and
peak memory at the largest global batch over peak memory at global batch = chunk size.
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
    layer = nn.TransformerEncoderLayer(args.dim, nhead=4, dim_feedforward=4 * args.dim, dropout=0.1,
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
        cached_step(encode, chunks, loss_of, lambda t: t.backward())
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
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    return {"global_batch": G, "chunk_size": chunk, "mode": "cached" if chunk < G else "uncached",
            "step_s": min(times), "peak_mib": peak / 2**20, "device": device.type}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is present")
    ap.add_argument("--child", type=int, nargs=2, metavar=("GLOBAL", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.global_batch, args.chunk_size = args.child
        print(json.dumps(one_config(args)))
        return 0

    rows = []
    passthrough = ["--seq", str(args.seq), "--dim", str(args.dim), "--layers", str(args.layers),
                   "--steps", str(args.steps), "--threads", str(args.threads)] + (["--cpu"] if args.cpu else [])
    for G in args.sizes:
        for chunk in sorted({min(args.chunk, G), G}):
            out = subprocess.run([sys.executable, __file__, "--child", str(G), str(chunk), *passthrough],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"G={G} chunk={chunk}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"G={G:5d} chunk={chunk:5d} {row['mode']:8s} step {row['step_s']:8.3f} s   "
                  f"peak {row['peak_mib']:9.1f} MiB ({row['device']})", flush=True)

    by = {(r["global_batch"], r["mode"]): r for r in rows}
    print("\ncached / uncached at the same global batch (time; memory):")
    for G in args.sizes:
        a, b = by.get((G, "cached")), by.get((G, "uncached"))
        if a and b:
            print(f"  G={G:5d}: time x{a['step_s'] / b['step_s']:.2f}; peak memory x{a['peak_mib'] / b['peak_mib']:.2f}")
    small = by.get((min(args.chunk, args.sizes[0]), "uncached"))
    big = by.get((args.sizes[-1], "cached"))
    if small and big:
        print(f"peak memory, cached G={args.sizes[-1]} over G=chunk={small['global_batch']}: "
              f"x{big['peak_mib'] / small['peak_mib']:.2f}  (uncached G={args.sizes[-1]}: "
              f"x{by[(args.sizes[-1], 'uncached')]['peak_mib'] / small['peak_mib']:.2f})"
              if (args.sizes[-1], "uncached") in by else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
