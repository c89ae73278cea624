"""The fault driver: SIGKILL (and a full disk) at seeded named points of ``fit``, ``encode``, ``mine`` and
``eval``; each interrupted command is resumed (``embedkit fit resume=RUN``) or re-run until it finishes,
and its final outputs are compared with an uninterrupted run's.

    PYTHONPATH=. python bench/faults.py [--kills 10] [--seed 0] [--work DIR] [--quick]    (or: make faults)

fit: an uninterrupted reference run (its fault points traced, ``EMBEDKIT_FAULT_TRACE``), then a run
killed ``--kills`` times at points drawn (seeded) from the trace: a named point (``checkpoint_write``,
``train_batch``, ``validation_batch``; ``embedkit/fault_points.py``) and which of its reaches, after the
step the process resumes from. Checked: the final weights equal the reference's (<= 1e-6), exactly one
MLflow run holds the reference's whole metric history (every logged step, each value the same, a step
logged twice the same value twice), a kill between a checkpoint's write and its rename leaves a stale
temporary that the next process ignores and removes, and (``enospc``) a full disk at a checkpoint write
exits 2 with one line and leaves the previous checkpoint as ``last.ckpt``. encode, mine and eval: the
same command re-run after each kill; the outputs byte-identical to an uninterrupted run's.

The CI test (tests/e2e/test_fault_driver.py) runs a shorter seeded set of the same code. docs/faults.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.cli import run_cli  # noqa: E402

#: the demo (``embedkit fit``'s defaults) made to checkpoint and validate often enough to be killed there
FULL_FIT = ["trainer.max_steps=400", "trainer.checkpoint_every=50", "trainer.val_check_interval=100",
            "trainer.progress=log"]
#: the CI set: the small demo of tests/e2e (batch 8, no workers), validated and checkpointed every 10 steps
QUICK_FIT = ["data.demo.train_size=256", "data.demo.val_size=16", "data.demo.holdout_combinations=4",
             "data.train.shuffle_buffer=16", "data.train.num_workers=0", "train.global_batch_size=8",
             "train.chunk_size=8", "data.train.task_batch_size=8", "trainer.progress=none", "trainer.max_steps=30",
             "trainer.checkpoint_every=10", "trainer.val_check_interval=10", "trainer.log_every_n_steps=1"]
FIT_POINTS = ("checkpoint_write", "validation_batch", "train_batch")
#: a wall-clock kill's seconds after the process starts (Lightning's import takes ~8 s of them)
WALL_SECONDS = (10.0, 30.0)
KILLED = -9  # subprocess's return code for a child killed by SIGKILL
TOLERANCE = 1e-6


@dataclass
class Fault:
    """One interrupted process: the plan it ran under, the step it had resumed from, how it ended."""

    plan: str
    resumed_from: int | None  # None: a command re-run from its own partial outputs
    returncode: int
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        start = "" if self.resumed_from is None else f"resumed from step {self.resumed_from:>4}  "
        return (f"{self.plan:<32} {start}exit {self.returncode}"
                + (f"  ({'; '.join(self.notes)})" if self.notes else ""))


@dataclass
class Report:
    """What one command's faulted run came to: the faults, the checks' problems (none: it passed)."""

    command: str
    faults: list[Fault] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    max_weight_diff: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = f"{self.command}: {'OK' if self.ok else 'FAILED'}, {len(self.faults)} faults"
        if self.max_weight_diff is not None:
            head += f", max weight difference {self.max_weight_diff:.2e}"
        return [head] + [f"  {f.line()}" for f in self.faults] + [f"  problem: {p}" for p in self.problems]


def launch(args: list[str], cwd: Path, plan: str = "", trace: Path | None = None):
    """One ``embedkit`` process (this checkout's), under a fault plan and/or a trace file."""
    env = {"EMBEDKIT_FAULT_PLAN": plan} if plan else {}
    if trace is not None:
        env["EMBEDKIT_FAULT_TRACE"] = str(trace)
    return run_cli(args, cwd, **env)


def expect(result, code: int, what: str) -> None:
    if result.returncode != code:
        raise AssertionError(f"{what}: exit {result.returncode}, expected {code}\n{result.stdout[-2000:]}\n"
                             f"{result.stderr[-3000:]}")


# ---------------------------------------------------------------- fit


def checkpoint_step(ckpt: Path) -> int:
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])


def resumed_step(run_dir: Path) -> int:
    """The step the next ``resume=`` starts from (0: nothing to resume from)."""
    from embedkit.runs import RunDir

    ckpt = RunDir(run_dir).newest_good_checkpoint(warn=lambda line: None)
    return checkpoint_step(ckpt) if ckpt else 0


def draw_fault(rng: random.Random, trace: list[str], step: int, segment: range, kind: str,
               others: tuple[str, ...] = FIT_POINTS) -> str:
    """``point:count`` for a process resuming from ``step``: a reach of the point ``kind`` drawn from
    ``segment`` of the reference's trace (where it holds none, the next one after it; where there is
    none, the same for ``others``), counted from the process's first reach.

    A resumed process's reaches are the trace's after step ``step``'s training batch (it neither writes
    the checkpoint it resumed from nor repeats that step's validation)."""
    batches = [i for i, name in enumerate(trace) if name == "train_batch"]
    origin = 0 if step == 0 else batches[step] if step < len(batches) else len(trace)  # the process's first reach
    lo = max(origin, segment.start)
    inside, later = range(lo, max(lo, segment.stop)), range(lo, len(trace))
    for names in ((kind,), others):
        for window, pick in ((inside, rng.choice), (later, min)):  # later: the earliest, to leave room
            hits = [i for i in window if trace[i] in names]
            if hits:
                target = pick(hits)
                name = trace[target]
                return f"{name}:{sum(1 for i in range(origin, target + 1) if trace[i] == name)}"
    raise AssertionError(f"no fault point left after step {step}")


def segments(trace: list[str], n: int) -> list[range]:
    """``n`` consecutive stretches of the trace after the first checkpoint (before it there is nothing
    to resume from): fault i is drawn from stretch i, so the faults move through the whole run."""
    start = trace.index("checkpoint_write") + 1
    bounds = [start + (len(trace) - start) * i // n for i in range(n + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(n)]


def weights_diff(a: Path, b: Path) -> float:
    import torch

    wa = torch.load(a, map_location="cpu", weights_only=False)["state_dict"]
    wb = torch.load(b, map_location="cpu", weights_only=False)["state_dict"]
    if wa.keys() != wb.keys():
        return float("inf")
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def metric_history(db: Path) -> tuple[list[str], dict[tuple[str, int], list[float]]]:
    """(the MLflow runs' ids, newest first; {(metric, step): every value the newest logged}) in ``db``."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    points: dict[tuple[str, int], list[float]] = {}
    for run in runs[:1]:
        for key in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, key):
                points.setdefault((key, m.step), []).append(m.value)
    return [r.info.run_id for r in runs], points


def history_problems(reference: Path, faulted: Path) -> list[str]:
    """Exactly one MLflow run, holding every (metric, step) of the reference's with the same value
    (each time it was logged), and nothing the reference did not log."""
    _, ref = metric_history(reference)
    runs, got = metric_history(faulted)
    problems = [] if len(runs) == 1 else [f"{len(runs)} MLflow runs, expected one"]
    for (key, step), values in sorted(ref.items()):
        if (key, step) not in got:
            problems.append(f"{key} at step {step}: missing")
        elif any(abs(v - values[0]) > TOLERANCE * max(1.0, abs(values[0])) for v in got[(key, step)]):
            problems.append(f"{key} at step {step}: {got[(key, step)]}, the reference logged {values[0]}")
    problems += [f"{key} at step {step}: logged, not in the reference" for key, step in sorted(set(got) - set(ref))]
    return problems[:20]


class FitFaults:
    """``embedkit fit ARGS`` uninterrupted (``whole``) and interrupted (``cut``) under ``work``."""

    def __init__(self, work: Path, args: list[str], log: Callable[[str], None] = print):
        self.work, self.args, self.log = Path(work), list(args), log
        self.whole, self.cut = self.work / "whole", self.work / "cut"
        self.trace_path = self.work / "whole.trace"

    def fit(self, run: Path, plan: str = "", trace: Path | None = None):
        db = run.with_suffix(".db")
        return launch(["fit", *self.args, f"run.dir={run}", f"tracking.uri=sqlite:///{db}"], self.work, plan, trace)

    def resume(self, plan: str = ""):
        return launch(["fit", f"resume={self.cut}"], self.work, plan)

    def reference(self) -> list[str]:
        """The uninterrupted run; its fault points' reaches, in order."""
        if not (self.whole / "checkpoints").is_dir():
            self.trace_path.unlink(missing_ok=True)
            started = time.monotonic()
            expect(self.fit(self.whole, trace=self.trace_path), 0, "the uninterrupted fit")
            self.log(f"fit: the uninterrupted run took {time.monotonic() - started:.0f}s")
        return self.trace_path.read_text().split()

    def run(self, kills: int, seed: int, enospc: bool = False, wall: int = 0, early: bool = False) -> Report:
        """The reference, then (``early``) a SIGKILL after a training batch before the first checkpoint
        (the resume starts the run again from step 0, in the same MLflow run), (``enospc``) a full disk at
        a checkpoint write, ``kills`` SIGKILLs at seeded named points and ``wall`` at seeded times
        (``wall_kill``), each followed by a resume, then the checks."""
        self.work.mkdir(parents=True, exist_ok=True)
        trace = self.reference()
        rng = random.Random(seed)
        kinds = ["checkpoint_write"] * enospc + [FIT_POINTS[(i + seed) % len(FIT_POINTS)] for i in range(kills)]
        stretches = segments(trace, len(kinds))
        report = Report(f"fit ({'a kill before the first checkpoint, ' if early else ''}"
                        f"{'a full disk, ' if enospc else ''}{kills} SIGKILLs at named points"
                        + (f", {wall} at seeded times" if wall else "") + f"; seed {seed})")
        if early:
            before = trace[:trace.index("checkpoint_write")].count("train_batch")
            report.faults.append(self.interrupt(f"train_batch:{random.Random(f'{seed}-early').randint(1, before)}", 0))
            self.log(f"fit: a kill before the first checkpoint: {report.faults[-1].line()}")
        for i, kind in enumerate(kinds):
            step = resumed_step(self.cut) if self.cut.exists() else 0  # 0 too for a run killed before its first
            if step >= len([n for n in trace if n == "train_batch"]):
                report.problems.append(f"the run finished before fault {i + 1}")
                break
            full_disk = enospc and i == 0  # a failing write: only a checkpoint write
            plan = draw_fault(rng, trace, step, stretches[i], kind, () if full_disk else FIT_POINTS)
            fault = self.interrupt(plan + (":enospc" if full_disk else ""), step)
            report.faults.append(fault)
            self.log(f"fit: fault {i + 1}/{len(kinds)}: {fault.line()}")
        for _ in range(wall):
            report.faults.append(self.wall_kill(rng.uniform(*WALL_SECONDS), resumed_step(self.cut)))
            self.log(f"fit: wall-clock kill: {report.faults[-1].line()}")
        expect(self.resume(), 0, "the final resume")
        self.check(report)
        return report

    def wall_kill(self, seconds: float, step: int) -> Fault:
        """``resume=`` SIGKILLed ``seconds`` after its start, wherever it is (not reproducible to the
        step: start-up time varies; a process that finished first is noted, not an error)."""
        import signal
        import subprocess

        from tests.helpers.cli import cli_env

        proc = subprocess.Popen([sys.executable, "-m", "embedkit", "fit", f"resume={self.cut}"], cwd=self.work,
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        fault = Fault(f"wall clock {seconds:.1f}s", step, proc.returncode)
        if proc.returncode not in (KILLED, 0):
            fault.notes.append(f"not killed: {err[-500:]}")
        elif proc.returncode == 0:
            fault.notes.append("finished before the kill")
        return fault

    def interrupt(self, plan: str, step: int) -> Fault:
        """One process (a fresh fit, else a resume) under ``plan``; what it ended in, checked."""
        from embedkit.runs import RunDir

        r = self.resume(plan) if RunDir(self.cut).is_run() else self.fit(self.cut, plan)
        fault = Fault(plan, step, r.returncode)
        if plan.endswith(":enospc"):
            fault.notes += self.full_disk_problems(r)
        elif r.returncode != KILLED:
            fault.notes.append(f"not killed: {r.stderr[-500:]}")
        stale = sorted(p.name for p in (self.cut / "checkpoints").glob(".*.tmp"))
        if stale:
            fault.notes.append(f"left {', '.join(stale)}")
        return fault

    def full_disk_problems(self, r) -> list[str]:
        """A full disk: exit 2, one line, no temporary, ``last.ckpt`` the newest complete step file."""
        import os

        from embedkit.runs import RunDir

        run = RunDir(self.cut)
        errors = [line for line in r.stderr.splitlines() if line.startswith("embedkit: error:")]
        ok = (r.returncode == 2 and len(errors) == 1 and "disk full writing" in errors[0]
              and f"resume with: embedkit fit resume={self.cut}" in errors[0]
              and not list(run.checkpoints_dir.glob(".*.tmp")) and run.step_checkpoints()
              and os.path.samefile(run.last_checkpoint, run.step_checkpoints()[-1])
              and f"previous checkpoint {run.step_checkpoints()[-1]} is intact" in errors[0])
        return ["full disk: one line, previous checkpoint intact"] if ok else [
            f"PROBLEM full disk: exit {r.returncode}, {errors or r.stderr[-1500:]}"]

    def check(self, report: Report) -> None:
        from embedkit.runs import RunDir

        report.problems += [f"fault {i + 1} ({f.plan}): {n}" for i, f in enumerate(report.faults) for n in f.notes
                            if n.startswith(("not killed", "PROBLEM"))]
        if list(RunDir(self.cut).checkpoints_dir.glob(".*.tmp")):
            report.problems.append("a stale temporary is left after the run finished")
        diff = weights_diff(RunDir(self.whole).last_checkpoint, RunDir(self.cut).last_checkpoint)
        report.max_weight_diff = diff
        if not diff <= TOLERANCE:
            report.problems.append(f"final weights differ by {diff:.3e} (> {TOLERANCE})")
        report.problems += history_problems(self.whole.with_suffix(".db"), self.cut.with_suffix(".db"))


# ---------------------------------------------------------------- encode, mine, eval: re-run the same command


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def outputs_of(path: Path) -> dict[str, bytes]:
    return files_of(path) if path.is_dir() else {"(the output file)": path.read_bytes()} if path.exists() else {}


def rerun_faults(name: str, args: Callable[[Path], list[str]], out: Callable[[Path], Path], work: Path,
                 plans: list[str], log: Callable[[str], None] = print) -> Report:
    """``embedkit <args(dst)>`` uninterrupted into ``ref``, then into ``cut`` under each of ``plans``
    (each a SIGKILL), re-run the same after each, then once without a plan: the outputs byte-identical."""
    report = Report(f"{name} ({len(plans)} faults)")
    expect(launch(args(work / f"{name}-ref"), work), 0, f"the uninterrupted {name}")
    for plan in plans:
        r = launch(args(work / f"{name}-cut"), work, plan)
        fault = Fault(plan, None, r.returncode)
        if r.returncode != KILLED:
            report.problems.append(f"{plan}: not killed (exit {r.returncode}): {r.stderr[-500:]}")
        report.faults.append(fault)
        log(f"{name}: {fault.line()}")
    expect(launch(args(work / f"{name}-cut"), work), 0, f"the re-run {name}")
    ref, cut = outputs_of(out(work / f"{name}-ref")), outputs_of(out(work / f"{name}-cut"))
    if not ref or ref != cut:
        differ = sorted(k for k in set(ref) | set(cut) if ref.get(k) != cut.get(k))
        report.problems.append(f"outputs differ from the uninterrupted run's: {differ[:10]}")
    return report


def write_corpus(path: Path, rows: int) -> Path:
    """A corpus for ``encode``: texts, and every third row an image (a small PNG beside it)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        row = {"text": f"a {['red', 'green', 'blue'][i % 3]} square number {i}"}
        if i % 3 == 0:
            Image.new("RGB", (40, 40), (7 * i % 256, 90, 200)).save(path.parent / f"img{i}.png")
            row["image"] = f"img{i}.png"
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def encode_faults(work: Path, model: Path, kills: int, seed: int, log=print) -> Report:
    corpus = write_corpus(work / "corpus" / "rows.jsonl", 40)
    parts = 5  # 40 rows, part_size=8
    rng = random.Random(seed)
    plans = [f"encode_part:{rng.randint(2, parts - 1)}", "encode_part:1"][:kills]  # the second: the re-run's first
    return rerun_faults("encode", lambda dst: ["encode", f"model={model}", f"input={corpus}", f"out={dst}.npy",
                                               "part_size=8", "batch_size=8"],
                        lambda dst: dst.with_suffix(".npy"), work, plans, log)


def demo_shards(work: Path, fit_args: list[str]) -> Path:
    """The demo's training shards, copied as a shard set of two subsets (what ``mine`` reads)."""
    from embedkit.config.loader import compose
    from embedkit.data.demo import ensure_demo_shards

    src = work / "mine-src"
    if not src.is_dir():
        demo = ensure_demo_shards(compose(["recipe=demo", *fit_args])["data"]["demo"], log=lambda m: None)
        for shard in sorted(Path(demo).glob("*/train-*.tar")):
            (src / shard.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(shard, src / shard.parent.name / shard.name)
    return src


def mine_faults(work: Path, model: Path, seed: int, log=print) -> Report:
    src = demo_shards(work, QUICK_FIT)  # the small demo's shards: two subsets, a shard each
    rng = random.Random(seed)
    plans = ["mine_cache:1", f"mine_shard:{rng.randint(1, 2)}"]
    return rerun_faults("mine", lambda dst: ["mine", f"model={model}", f"shards={src}", f"out={dst}", "num_negatives=2",
                                             "window=[1,6]", "batch_size=16", "threshold=2"],
                        lambda dst: dst, work, plans, log)


def eval_faults(work: Path, model: Path, log=print) -> Report:
    from tests.helpers import mmeb_fixture

    root = work / "mmeb"
    if not root.is_dir():
        mmeb_fixture.build(root, rows=20)
    return rerun_faults("eval", lambda dst: ["eval", f"model={model}", f"data.eval.root={root}",
                                             "data.eval.datasets=[N24News,RefCOCO]", "train.chunk_size=8",
                                             "tracking.enabled=false", f"out={dst}"],
                        lambda dst: dst, work, ["eval_dataset:1"], log)


def run_all(work: Path, fit_args: list[str], kills: int, seed: int, commands=("fit", "encode", "mine", "eval"),
            enospc: bool = True, wall: int = 0, log: Callable[[str], None] = print) -> list[Report]:
    """The fit's faults (its reference run is the model the other commands use), then the others'."""
    fit = FitFaults(work / "fit", fit_args, log)
    reports = [fit.run(kills, seed, enospc=enospc, wall=wall, early=True)] if "fit" in commands else []
    fit.reference()
    model = fit.whole
    if "encode" in commands:
        reports.append(encode_faults(work, model, min(kills, 2), seed, log))
    if "mine" in commands:
        reports.append(mine_faults(work, model, seed, log))
    if "eval" in commands:
        reports.append(eval_faults(work, model, log))
    return reports


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs at named points of the fit (after a full disk)")
    ap.add_argument("--wall", type=int, default=2, help="then SIGKILLs at seeded times after a resume's start")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="the CI's small config instead of the demo's")
    ap.add_argument("--commands", default="fit,encode,mine,eval")
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="embedkit-faults-"))
    started = time.monotonic()
    reports = run_all(work, QUICK_FIT if a.quick else FULL_FIT, a.kills, a.seed, tuple(a.commands.split(",")),
                      wall=a.wall, log=lambda m: print(m, flush=True))
    print(f"\nfault driver, seed {a.seed}, {time.monotonic() - started:.0f}s, runs in {work}")
    for report in reports:
        print("\n".join(report.lines()))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
