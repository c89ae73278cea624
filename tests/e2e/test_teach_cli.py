"""``embedkit teach`` end to end: a small demo run teaches the demo shards; the manifest names the
teacher's sha256, dim and dtype; a teach killed mid-way (SIGKILL at a fault point, one process launch)
and re-run gives byte-identical shards; ``fit loss=distill`` trains on the taught shards and refuses
untaught ones in one line naming them."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from embedkit.cli import main as cli
from tests.helpers.cli import cli_env

SMALL = ["data.demo.train_size=48", "data.demo.val_size=8", "data.demo.holdout_combinations=4",
         "train.global_batch_size=8", "train.chunk_size=4", "trainer.max_steps=2", "data.train.num_workers=0",
         "data.train.shuffle_buffer=8", "tracking.enabled=false", "trainer.progress=none"]


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    from embedkit.config.loader import compose
    from embedkit.data.demo import ensure_demo_shards

    tmp = tmp_path_factory.mktemp("teach")
    run = tmp / "runs" / "teacher"
    assert cli(["fit", "recipe=demo", f"run.dir={run}", *SMALL]) == 0
    demo_dir = ensure_demo_shards(compose(["recipe=demo", *SMALL])["data"]["demo"], log=lambda m: None)
    src = tmp / "src"
    for shard in sorted(Path(demo_dir).glob("*/train-*.tar")):
        (src / shard.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(shard, src / shard.parent.name / shard.name)
    out = tmp / "taught"
    assert cli(["teach", f"model={run}", f"shards={src}", f"out={out}", "batch_size=16"]) == 0
    return tmp, run, src, out


def test_the_manifest_names_the_teacher_and_every_example_is_taught(taught):
    from embedkit.data.shards import decode_sample, iter_samples
    from embedkit.runs import RunDir

    tmp, run, src, out = taught
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["teaching"]
    from embedkit.mining.provenance import file_sha256

    assert t["model_sha256"] == file_sha256(RunDir(run).checkpoint())
    assert t["dtype"] == "float16" and t["judge"] is None and t["examples"] == 48
    assert sum(s["count"] for s in manifest["subsets"].values()) == 48
    for shard in out.rglob("*.tar"):
        for key, files in iter_samples(shard):
            ex = decode_sample(key, files)
            assert ex.teacher.embeddings.shape == (2 + len(ex.negatives), t["dim"])


def test_a_killed_teach_rerun_is_byte_identical(taught):
    tmp, run, src, out = taught
    again = tmp / "again"
    args = [sys.executable, "-m", "embedkit", "teach", f"model={run}", f"shards={src}", f"out={again}", "batch_size=16"]
    proc = subprocess.run(args, cwd=tmp, env=cli_env(EMBEDKIT_FAULT_PLAN="teach_shard:1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not (again / "manifest.json").exists() and len(list(again.rglob("*.tar"))) == 1
    assert cli(["teach", f"model={run}", f"shards={src}", f"out={again}", "batch_size=16"]) == 0
    assert files_of(again) == files_of(out)


def test_fit_distills_from_taught_shards_and_refuses_untaught_ones(taught, capsys):
    tmp, run, src, out = taught
    for loss in (["loss=distill", "loss.directions=[q2c,c2q]"], ["loss=soft_labels", "loss.inner=hardness_weighted"]):
        assert cli(["fit", "recipe=demo", f"run.dir={tmp / 'runs' / loss[0][5:]}", *SMALL, f"data.train.shards={out}",
                    *loss]) == 0
    capsys.readouterr()
    assert cli(["fit", "recipe=demo", f"run.dir={tmp / 'runs' / 'untaught'}", *SMALL, f"data.train.shards={src}",
                "loss=distill"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no teacher data" in err[0] and str(src) in err[0], err


def test_teach_user_errors_are_one_line(tmp_path, capsys):
    assert cli(["teach", "model=x"]) == 2
    assert cli(["teach", "model=x", f"shards={tmp_path}", "out=y"]) == 2
    assert cli(["teach", "model=x", f"shards={tmp_path}", "out=y", "judge=nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("embedkit: error: ") for e in err), err
