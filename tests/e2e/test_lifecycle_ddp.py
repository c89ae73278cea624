"""Exact resume under 2-process DDP (gloo on CPU), the hardest combination the resume must survive: GradCache chunks, one
hard negative, a task-homogeneous mix of two subsets, 2 DataLoader workers per rank, and gradient
accumulation with the SIGTERM arriving inside an accumulation cycle.

Three ``embedkit fit`` launches, each of 2 processes (Lightning's DDP launcher starts rank 1 by
re-running the command): the uninterrupted run, the same run stopped by a real SIGTERM to rank 0
after an odd micro-batch, and ``embedkit fit resume=RUN_DIR``. The resumed run must equal the
uninterrupted one: final weights, ``train/loss`` at every logged step, one MLflow run FINISHED.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image

from embedkit.data.schema import Example, Item
from embedkit.data.shards import encode_example, write_shard
from tests.helpers.cli import run_cli

pytestmark = pytest.mark.slow

STEPS, ACCUMULATE = 6, 2
STOP_AFTER = 7  # micro-batches: inside the 4th accumulation cycle, so the stop lands on step 4
STOP_STEP = -(-STOP_AFTER // ACCUMULATE)


def _example(src: str, s: int, i: int) -> Example:
    # subset A: image queries; subset B: text only. Every example has its own hard negative.
    words = ["red", "green", "blue", "circle", "square", "left", "right", "top", "bottom"]
    text = " ".join(words[(i * 7 + k * 3 + s) % len(words)] for k in range(3))
    image = Image.new("RGB", (56, 56), ((40 * i) % 256, (90 * s) % 256, 128)) if src == "A" else None
    return Example(query=Item(text=f"{text} <|image_1|>" if image else text, image=image),
                   positive=Item(text=f"{text} {src}"),
                   negatives=[Item(text=f"{words[i % len(words)]} {src} {words[(i + 4) % len(words)]}")], task=src)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-shards")
    for src in ("A", "B"):
        for s in range(2):  # 2 shards per subset over 4 reader slots: each slot reads every 4th sample
            write_shard(root / src / f"train-{s:06d}.tar",
                        [encode_example(_example(src, s, i), f"{src}{s}x{i:04d}") for i in range(24)])
    return root


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _runs(db: Path):
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def _losses(client, run) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}


def test_ddp_sigterm_inside_an_accumulation_cycle_then_resume_equals_the_uninterrupted_run(tmp_path, shards):
    common = ["fit", "recipe=demo", "data.demo.enabled=false", f"data.train.shards={shards}",
              "data.val.enabled=false", "data.train.num_negatives=1", "data.train.task_batch_size=2",
              "data.train.num_workers=2", "data.train.shuffle_buffer=8",
              "train.global_batch_size=8", "train.chunk_size=2", f"train.accumulate_steps={ACCUMULATE}",
              "train.lr=1e-3", "train.warmup=0.2",
              # LoRA dropout: the masks depend on each rank's RNG state and GradCache's replay of it
              "model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.2", "model.lora.init=gaussian",
              "trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy=ddp",
              f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", "trainer.checkpoint_every=2",
              "trainer.progress=log", "trainer.val_check_interval=null"]
    cut = tmp_path / "cut"

    # the default run dir (runs/<recipe>-<time>): rank 1, started later by Lightning, must use rank 0's
    (tmp_path / "w").mkdir()
    r = run_cli([*common, f"tracking.uri=sqlite:///{tmp_path / 'whole.db'}"], tmp_path / "w")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    (whole,) = (tmp_path / "w" / "runs").iterdir()  # one run dir, not one per rank
    assert sorted(p.name for p in whole.iterdir()) == ["checkpoints", "config.yaml", "mlflow_run_id"]

    r = run_cli([*common, f"run.dir={cut}", f"tracking.uri=sqlite:///{tmp_path / 'cut.db'}"], tmp_path,
                EMBEDKIT_TEST_SIGNAL_AFTER_BATCH=str(STOP_AFTER))
    assert r.returncode == 143, r.stdout[-2000:] + r.stderr[-4000:]
    assert f"stopped at step {STOP_STEP}; resume with: embedkit fit resume={cut}" in r.stdout
    stopped = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert stopped["global_step"] == STOP_STEP  # the accumulation cycle was completed, not cut
    assert len(stopped["embedkit"]["rng"]) == 2  # each rank's RNG states
    client, runs = _runs(tmp_path / "cut.db")
    assert [x.info.status for x in runs] == ["KILLED"]
    before = _losses(client, runs[0])

    r = run_cli(["fit", f"resume={cut}", "trainer.progress=none"], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]

    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys() and "loss_fn.temperature.log_scale" in a and any("lora_" in k for k in a)
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-6, diff

    client, runs = _runs(tmp_path / "cut.db")
    assert [x.info.status for x in runs] == ["FINISHED"]  # one run, continued
    resumed = _losses(client, runs[0])
    wclient, wruns = _runs(tmp_path / "whole.db")
    expected = _losses(wclient, wruns[0])
    logged_after = {s for s in expected if s > max(before)}
    assert len(logged_after) >= (STEPS - STOP_STEP) * ACCUMULATE - 1, (sorted(before), sorted(expected))
    assert {s: resumed.get(s) for s in logged_after} == {s: expected[s] for s in logged_after}
    assert resumed == expected  # and before the stop, the same run
