"""Where a training step's time goes: steps/s, host syncs per step, device idle share, top host ops.

    python bench/profile_step.py --preset tiny --device cpu                  # CPU rehearsal, < 1 min
    python bench/profile_step.py --preset demo --device cuda --steps 50      # the demo recipe
    python bench/profile_step.py --preset qwen300m --device cuda --steps 5   # ~300M Qwen2-VL-shaped
    python bench/profile_step.py --preset demo --device cuda --compile       # + train.compile=true
    ... --set key=value ...   any config override on top of the preset (e.g. data.train.num_workers=12)

The step is the one ``embedkit fit`` runs: the demo recipe composed with the preset's overrides,
``EmbeddingModule`` + ``EmbeddingDataModule`` (shards -> ``ChunkCollate`` in DataLoader workers ->
``training_step`` -> GradCache -> optimizer), a Lightning ``Trainer`` built with fit's settings
(no MLflow logger, no checkpoints, no validation: those run once per interval, not per step).

One run, four phases of the same training loop:
  1. ``--warmup`` steps (allocator, kernels, torch.compile);
  2. ``--steps`` timed steps (the device synchronised only at both ends): steps/s;
  3. ``--profile-steps`` steps under ``torch.profiler``: the share of the step wall time the device
     is idle (no kernel or copy running: the host is the limit), the host's synchronisations
     (``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` calls and their time, ``aten::item`` /
     ``nonzero`` calls) and the top host ops by self CPU time;
  4. one step with every host-synchronising call counted by call site: on CUDA the syncs
     ``torch.cuda.set_sync_debug_mode`` reports (real), and on any device ``SyncCounter``'s
     sync-prone calls (``bench/host_sync.py``; on a CPU they do not stall, but each one
     would on a GPU).
Steps/s excludes phases 3-4 (their instrumentation slows the host).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

PRESETS = {
    # CPU rehearsal: the demo model, a small batch cut into chunks (GradCache on), small data
    "tiny": ["data.demo.train_size=512", "data.demo.val_size=16", "data.demo.holdout_combinations=4",
             "data.train.shuffle_buffer=64", "train.global_batch_size=16", "train.chunk_size=4",
             "data.train.task_batch_size=16"],
    # the demo recipe as `embedkit fit` trains it (global batch 64, one chunk per side)
    "demo": [],
    # a ~300M Qwen2-VL-shaped setting (docs/gradcache.md, "Host overhead"): global batch 256, chunks of 32, bf16-mixed
    "qwen300m": ["model.backbone.tiny_hidden_size=1024", "model.backbone.tiny_layers=16",
                 "model.backbone.tiny_vision_layers=16", "data.demo.image_size=336", "data.demo.train_size=4096",
                 "train.global_batch_size=256", "train.chunk_size=32", "trainer.precision=bf16-mixed",
                 "data.train.num_workers=12"],
}


def build(overrides: list[str], device: str, max_steps: int):
    """(module, datamodule, trainer, cfg, phases) as ``embedkit fit`` builds them (fit.py's Trainer settings)."""
    from embedkit.commands.fit import make_strategy
    from embedkit.config.loader import compose
    from embedkit.data.datamodule import EmbeddingDataModule, resolve_shards
    from embedkit.training.module import EmbeddingModule

    cfg = compose(["recipe=demo", f"trainer.max_steps={max_steps}", "tracking.enabled=false", *overrides])
    train, trainer_cfg = cfg["train"], cfg["trainer"]
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    module = EmbeddingModule.build(cfg["model"], cfg["loss"], train, seed=cfg["seed"], max_steps=max_steps,
                                   accumulate=train["accumulate_steps"], config=cfg)
    train_shards, val_shards = resolve_shards(cfg["data"], log=lambda *a, **k: None)
    data = EmbeddingDataModule(cfg["data"], module.encoder.processor(), train_shards, val_shards, seed=cfg["seed"],
                               global_batch_size=train["global_batch_size"], chunk_size=train["chunk_size"],
                               chunk_tokens=train["chunk_tokens"], accumulate=module.accumulate,
                               sort_chunks=train["sort_chunks"])
    data.val_examples = []
    phases = Phases()
    trainer = L.Trainer(
        max_steps=max_steps, devices=1, accelerator=device, strategy=make_strategy(trainer_cfg),
        precision=trainer_cfg["precision"], logger=False, callbacks=[phases],
        log_every_n_steps=min(trainer_cfg["log_every_n_steps"], max_steps), enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        check_val_every_n_epoch=None, use_distributed_sampler=False, default_root_dir=tempfile.mkdtemp(),
    )
    return module, data, trainer, cfg, phases


class Phases(L.Callback):
    """A Lightning callback switching the phases of the module docstring by batch index. A step's window
    runs from its ``on_train_batch_start`` to the next one's, so Lightning's bookkeeping after the
    step (metrics, logging) and the next batch's fetch and transfer count too."""

    def __init__(self):
        self.plan: list[tuple[str, int]] = []
        self.marks: dict[str, float] = {}
        self.prof = self.counter = self.records = None
        self._warn = self._ann = None
        self._open: str | None = None
        self.tokens = Counter()

    def phase(self, i: int) -> tuple[str, int]:
        start = 0
        for name, n in self.plan:
            if i < start + n:
                return name, i - start
            start += n
        return "tail", i - start

    def _sync(self, module):
        import torch

        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def _close(self, module):
        """End the open phase (its last step's window ends here)."""
        import torch

        if self._ann is not None:
            self._ann.__exit__(None, None, None)
            self._ann = None
        name, self._open = self._open, None
        if name is None:
            return
        if name == "count":
            self.counter.__exit__(None, None, None)
            if self._warn is not None:
                torch.cuda.set_sync_debug_mode(0)
                self._warn.__exit__(None, None, None)
        self._sync(module)
        if name == "profile":
            self.prof.__exit__(None, None, None)
        self.marks[name + "_end"] = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        import torch

        name, k = self.phase(batch_idx)
        if self._ann is not None:
            self._ann.__exit__(None, None, None)
            self._ann = None
        if k == 0:
            self._close(module)
        if name != "tail":
            self.tokens["padded"] += batch.padded_tokens
            self.tokens["real"] += batch.real_tokens
            self.tokens["patches"] += sum(int(c["pixel_values"].shape[0]) for c in
                                          batch.query_chunks + batch.candidate_chunks if "pixel_values" in c)
            self.tokens["passes"] += len(batch.query_chunks) + len(batch.candidate_chunks)
            self.tokens["batches"] += 1
        if k == 0 and name != "tail":
            self._open = name
            self._sync(module)
            self.marks[name] = time.perf_counter()
            if name == "profile":
                acts = [torch.profiler.ProfilerActivity.CPU]
                if module.device.type == "cuda":
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
            if name == "count":
                from bench.host_sync import SyncCounter

                self.counter = SyncCounter()
                if module.device.type == "cuda":
                    self._warn = warnings.catch_warnings(record=True)
                    self.records = self._warn.__enter__()
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                self.counter.__enter__()
        if name == "profile":
            self._ann = torch.profiler.record_function("embedkit.train_step")
            self._ann.__enter__()

    def on_train_end(self, trainer, module):
        self._close(module)


def trace_stats(prof, steps: int) -> dict:
    """Device busy/idle within the annotated steps, and the host's sync calls, from the profiler."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = fh.name
    prof.export_chrome_trace(path)
    events = json.loads(Path(path).read_text()).get("traceEvents", [])
    os.unlink(path)
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("name") == "embedkit.train_step" and e.get("cat") in ("user_annotation", "cpu_op"))
    busy = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    wall = sum(b - a for a, b in windows)
    covered, i = 0.0, 0
    merged: list[list[float]] = []
    for a, b in busy:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    for a, b in windows:  # device-busy time inside the step windows
        for x, y in merged[i:]:
            if x >= b:
                break
            covered += max(0.0, min(b, y) - max(a, x))
    calls = Counter()
    times = Counter()
    for e in events:
        name = e.get("name", "")
        if name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
                    "aten::_local_scalar_dense", "aten::nonzero", "cudaMemcpyAsync", "aten::to", "aten::copy_"):
            calls[name] += 1
            times[name] += e.get("dur", 0)
    ops = sum(1 for e in events if e.get("cat") == "cpu_op" and e.get("name", "").startswith("aten::"))
    return {"wall_us": wall, "busy_us": covered, "kernels": len(busy), "calls": calls, "times": times,
            "steps": steps, "ops": ops}


def print_profile(phases, args) -> None:
    """Phase 3: the device idle share, aten ops and host calls per profiled step, the top host ops."""
    if phases.prof is None:
        return
    st = trace_stats(phases.prof, args.profile_steps)
    per = args.profile_steps
    if args.device == "cuda" and st["wall_us"]:
        idle = 1 - st["busy_us"] / st["wall_us"]
        print(f"device idle share (profiled steps): {idle:.1%} of {st['wall_us'] / per / 1000:.1f} ms/step "
              f"(device busy {st['busy_us'] / per / 1000:.1f} ms/step, {st['kernels'] / per:.0f} kernels+copies"
              f"/step); high = the host is the limit")
    else:
        print("device idle share: n/a on the CPU (host and device are one)")
    print(f"aten ops per step (nested included; each launches kernels on a GPU): {st['ops'] / per:.0f}")
    print("host-side calls per profiled step (count, total ms):")
    for name in sorted(st["calls"]):
        print(f"  {name:28s} {st['calls'][name] / per:8.1f}  {st['times'][name] / per / 1000:8.2f} ms")
    print(f"\ntop host ops by self CPU time (per {per} profiled steps):")
    print(phases.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    if args.trace:
        phases.prof.export_chrome_trace(args.trace)
        print(f"chrome trace: {args.trace}")


def print_syncs(phases, args) -> None:
    """Phase 4: the CUDA syncs of one step (on a GPU) and the sync-prone calls by site (any device)."""
    if phases.records is not None:
        sites = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in phases.records
                        if "synchroniz" in str(w.message).lower())
        print(f"\nCUDA syncs in one step (torch.cuda.set_sync_debug_mode): {sum(sites.values())}")
        for site, n in sites.most_common(args.top):
            print(f"  {n:6d}  {site}")
    if phases.counter is not None:
        c = phases.counter
        print(f"\nsync-prone calls in one step (SyncCounter, any device): {c.total()} "
              f"(+{c.total(()) - c.total()} on host-only tensors)")
        print(c.report(top=args.top))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (phase 2)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile of the chunk forward)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--top", type=int, default=15, help="rows of the host-op table and of the sync sites")
    ap.add_argument("--trace", help="also write the phase-3 chrome trace here")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides after the preset")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (use --device cpu for the rehearsal)", file=sys.stderr)
        return 2
    overrides = PRESETS[args.preset] + (["train.compile=true"] if args.compile else []) + list(args.set)
    plan = [("warmup", args.warmup), ("timed", args.steps), ("profile", args.profile_steps), ("count", 1)]
    total = sum(n for _, n in plan) + 1  # + one step whose start closes the last window
    module, data, trainer, cfg, phases = build(overrides, args.device, total)
    phases.plan = [(n, k) for n, k in plan if k > 0]
    train = cfg["train"]
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - started

    n_lm = sum(p.numel() for n, p in module.encoder.named_parameters() if ".visual." not in n)
    n_vis = sum(p.numel() for n, p in module.encoder.named_parameters() if ".visual." in n)
    print(f"== embedkit step profile: preset {args.preset}, device {args.device}"
          f" ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} threads'}),"
          f" torch {torch.__version__}")
    print(f"overrides: {' '.join(overrides) or '(none)'}")
    print(f"model: {n_lm / 1e6:.1f}M language+head, {n_vis / 1e6:.1f}M vision parameters; precision "
          f"{cfg['trainer']['precision']}; global batch {train['global_batch_size']}, chunk {train['chunk_size']}, "
          f"compile {train['compile']}, {cfg['data']['train']['num_workers']} loader workers")
    b = phases.tokens["batches"] or 1
    print(f"per step: {phases.tokens['passes'] / b:.1f} chunks (forward passes before replay), "
          f"{phases.tokens['padded'] / b:.0f} sequence slots ({phases.tokens['real'] / b:.0f} real tokens), "
          f"{phases.tokens['patches'] / b:.0f} image patches")
    m = phases.marks
    if "timed_end" in m:
        dt = m["timed_end"] - m["timed"]
        print(f"\nsteps/s: {args.steps / dt:.2f}  ({dt / args.steps * 1000:.1f} ms/step over {args.steps} steps,"
              f" after {args.warmup} warm-up steps; run wall {wall:.1f} s)")
    print_profile(phases, args)
    print_syncs(phases, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
