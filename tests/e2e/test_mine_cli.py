"""``embedkit mine`` end to end on the demo shards with a small demo run's checkpoint: the mined shards
train (``data.train.num_negatives=K``), the run is tagged with the manifest's hash, re-mining gives the
same bytes, and a mine killed mid-way completes when re-run."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from embedkit.cli import main as cli
from embedkit.data.shards import decode_sample, iter_samples
from tests.helpers.cli import cli_env

SMALL = ["data.demo.train_size=48", "data.demo.val_size=8", "data.demo.holdout_combinations=4",
         "train.global_batch_size=8", "train.chunk_size=8", "trainer.max_steps=2", "data.train.num_workers=0",
         "data.train.shuffle_buffer=8"]
# a 2-step model scores every candidate near its positive (all near -1 with some seeds): a loose
# threshold keeps K=2 per example
MINE = ["num_negatives=2", "window=[1,6]", "batch_size=16", "threshold=2"]


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from embedkit.config.loader import compose
    from embedkit.data.demo import ensure_demo_shards

    tmp = tmp_path_factory.mktemp("mine")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    try:
        assert cli(["fit", "recipe=demo", f"run.dir={tmp / 'runs' / 'first'}", *SMALL]) == 0
        demo_dir = ensure_demo_shards(compose(["recipe=demo", *SMALL])["data"]["demo"], log=lambda m: None)
        src = tmp / "src"
        for shard in sorted(Path(demo_dir).glob("*/train-*.tar")):
            (src / shard.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(shard, src / shard.parent.name / shard.name)
        out = tmp / "mined"
        assert cli(["mine", f"model={tmp / 'runs' / 'first'}", f"shards={src}", f"out={out}", *MINE]) == 0
        yield tmp, src, out
    finally:
        mp.undo()


def test_mined_shards_carry_k_negatives_scores_and_a_manifest(demo):
    import json

    tmp, src, out = demo
    manifest = json.loads((out / "manifest.json").read_text())
    m = manifest["mining"]
    assert m["window"] == [1, 6] and m["threshold"] == 2.0 and m["judge"]["name"] == "embedding"
    assert len(m["model_sha256"]) == 64 and set(m["dropped"]) == {"duplicate", "false_negative"}
    assert sorted(m["source_shards"]) == sorted(str(p.relative_to(src)) for p in src.rglob("*.tar"))
    n = 0
    for shard in sorted(out.rglob("*.tar")):
        src_keys = [k for k, _ in iter_samples(src / shard.relative_to(out))]
        keys = []
        for key, files in iter_samples(shard):
            ex = decode_sample(key, files)
            keys.append(key)
            assert len(ex.negatives) == len(ex.negative_scores) == 2
            n += len(ex.negatives)
        assert keys == src_keys  # the source sharding and order are kept
    assert n == m["kept"] > 0
    assert sum(s["count"] for s in manifest["subsets"].values()) == 48


def test_fit_trains_on_mined_shards_and_tags_the_manifest_hash(demo):
    import mlflow

    tmp, _, out = demo
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    try:
        assert cli(["fit", "recipe=demo", f"run.dir={tmp / 'runs' / 'mined'}", "run.name=mined", *SMALL,
                    f"data.train.shards={out}", "data.train.num_negatives=2"]) == 0
    finally:
        mp.undo()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    tags = {r.data.tags.get("mlflow.runName"): r.data.tags for r in runs}
    digest = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert tags["mined"]["embedkit.mined_manifest_sha256"] == digest
    assert "embedkit.mined_manifest_sha256" not in tags.get("first", {})


def test_remining_is_byte_identical_and_a_killed_mine_completes(demo):
    tmp, src, out = demo
    again = tmp / "again"
    args = [sys.executable, "-m", "embedkit", "mine", f"model={tmp / 'runs' / 'first'}", f"shards={src}", f"out={again}",
            *MINE]
    proc = subprocess.Popen(args, cwd=tmp, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("mine: wrote"):  # the first subset is written; the second is still to come
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)
    assert not (again / "manifest.json").exists()
    assert len(list(again.rglob("*.tar"))) == 1
    assert cli(["mine", f"model={tmp / 'runs' / 'first'}", f"shards={src}", f"out={again}", *MINE]) == 0
    assert files_of(again) == files_of(out)


def test_mine_user_errors_are_one_line(tmp_path, capsys):
    assert cli(["mine", "model=x"]) == 2
    assert cli(["mine", "model=x", f"shards={tmp_path}", "out=y", "num_negatives=2", "window=[5,2]"]) == 2
    assert cli(["mine", "model=x", f"shards={tmp_path}", "out=y", "num_negatives=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("embedkit: error: ") for e in err), err


def test_two_processes_mine_and_encode_what_one_does(demo):
    """One torchrun launch of 2 gloo processes runs ``mine`` and ``encode``: each corpus encoded once,
    split across the ranks (both ranks write shards and parts), the results those of one process."""
    import json

    import numpy as np

    from embedkit.data.schema import content_key
    from tests.helpers.cli import REPO

    tmp, src, out = demo
    run = tmp / "runs" / "first"
    corpus = tmp / "corpus.jsonl"
    words = "a red circle at the top left of a small blue square beside the green triangle".split()
    corpus.write_text("".join(json.dumps({"text": " ".join(words[: 1 + (7 * i) % len(words)])}) + "\n"
                              for i in range(11)))
    encode = [f"model={run}", f"input={corpus}", "part_size=3", "batch_size=2"]
    assert cli(["encode", *encode, f"out={tmp / 'one.npy'}"]) == 0
    mined = tmp / "mined-2p"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "helpers" / "scripts" / "ranks_mine_encode.py"),
         f"model={run}", f"shards={src}", f"out={mined}", *MINE, "--", *encode, f"out={tmp / 'two.npy'}"],
        cwd=tmp, env=cli_env(), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for rank in ("[0/2]", "[1/2]"):
        assert f"{rank} mine: wrote" in log and f"{rank} encode: " in log, log[-4000:]
    assert np.abs(np.load(tmp / "two.npy") - np.load(tmp / "one.npy")).max() <= 1e-6
    assert sorted(files_of(mined)) == sorted(files_of(out))
    for shard in sorted(out.rglob("*.tar")):
        one = [decode_sample(k, f) for k, f in iter_samples(shard)]
        two = [decode_sample(k, f) for k, f in iter_samples(mined / shard.relative_to(out))]
        assert [[content_key(n) for n in ex.negatives] for ex in two] == [[content_key(n) for n in ex.negatives]
                                                                         for ex in one]
        assert np.allclose([ex.negative_scores for ex in two], [ex.negative_scores for ex in one], atol=1e-5)
    one_m, two_m = (json.loads((d / "manifest.json").read_text())["mining"] for d in (out, mined))
    assert two_m == one_m
