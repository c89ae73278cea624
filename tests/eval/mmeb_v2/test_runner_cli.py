"""``embedkit eval benchmark=...`` end to end on the fixture layout with a tiny Qwen2-VL checkpoint: killed
after a task and rerun, it resumes from the cache and writes the bytes an uninterrupted run writes; the
fingerprints reach MLflow; a missing task exits 2 with the list; allow_missing marks the outputs partial;
2 gloo processes (one torchrun launch) give the scores of 1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from embedkit.cli import main as cli
from tests.eval.mmeb_v2 import fixtures as fx
from tests.helpers.cli import cli_env

PARSERS = ["image", "video_classification", "moment_retrieval", "vidore"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2cli")
    counts = fx.write_layout(tmp / "data", PARSERS)
    words = [f"ckpt={fx.tiny_checkpoint(tmp / 'tiny.ckpt')}", f"protocol_file={fx.small_protocol(tmp / 'p.yaml', counts)}",
             f"data.eval.mmeb_v2_root={tmp / 'data'}", "train.chunk_size=3", "tracking.enabled=false"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess's OMP_NUM_THREADS=1: the same float sums in every run
    yield tmp, words
    torch.set_num_threads(threads)


def files(out) -> dict[str, bytes]:
    return {f: (out / "mmeb_v2" / f).read_bytes() for f in ("results.json", "summary.json", "summary.md")}


def test_killed_mid_eval_resumes_from_the_cache_with_identical_bytes(setup, capsys):
    tmp, words = setup
    killed = subprocess.run([sys.executable, "-m", "embedkit", "eval", *words, f"out={tmp / 'a'}"], cwd=tmp,
                            env=cli_env(EMBEDKIT_FAULT_PLAN="eval_dataset:2"), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert not (tmp / "a" / "mmeb_v2" / "results.json").exists()
    assert len(list((tmp / "a" / "mmeb_v2" / "cache").rglob("*.pt"))) == 2
    assert cli(["eval", *words, f"out={tmp / 'a'}"]) == 0
    assert capsys.readouterr().out.count("(embeddings from the cache)") == 2
    tracked = [f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.enabled=true"]
    assert cli(["eval", *words, f"out={tmp / 'b'}", *tracked]) == 0
    assert "(embeddings from the cache)" not in capsys.readouterr().out
    assert files(tmp / "a") == files(tmp / "b")
    results = json.loads(files(tmp / "b")["results.json"])
    assert len(results["tasks"]) == 4 and results["partial"] is False
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}").search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}").search_experiments()])[0]
    assert run.data.tags["embedkit.mmeb_v2.protocol_fingerprint"] == results["protocol"]["fingerprint"]
    assert run.data.tags["embedkit.mmeb_v2.model_fingerprint"] == results["model"]["fingerprint"]
    assert run.data.metrics["mmeb_v2/overall"] == pytest.approx(
        100 * sum(r["score"] for r in results["tasks"].values()) / 4)


def test_a_missing_task_exits_2_with_the_list_and_allow_missing_marks_partial(setup, capsys):
    tmp, words = setup
    data = tmp / "data-missing"
    shutil.copytree(tmp / "data", data)
    shutil.rmtree(data / "QVHighlight" / "frames" / "qv1")
    shutil.rmtree(data / "K700")
    words = [w for w in words if not w.startswith("data.eval.mmeb_v2_root=")] + [f"data.eval.mmeb_v2_root={data}"]
    assert cli(["eval", *words, f"out={tmp / 'b'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 of 4 tasks" in err[0] and "K700: no folder" in err[0], err
    assert "QVHighlight: no clip folders in" in err[0] and err[0].startswith("embedkit: error: ")
    assert cli(["eval", *words, f"out={tmp / 'b'}", "allow_missing=true"]) == 0  # the other two from b's cache
    summary = json.loads((tmp / "b" / "mmeb_v2" / "summary.json").read_text())
    results = json.loads((tmp / "b" / "mmeb_v2" / "results.json").read_text())
    assert summary["partial"] is True and summary["missing"] == ["K700", "QVHighlight"]
    assert results["partial"] is True and results["missing"] == ["K700", "QVHighlight"]
    assert "PARTIAL" in (tmp / "b" / "mmeb_v2" / "summary.md").read_text()
    assert cli(["eval", *words, "report=x.json", "benchmark=mmeb_v2"]) == 2  # benchmark= and protocol_file=
    assert "not both" in capsys.readouterr().err
    assert cli(["eval", *words, f"report={tmp / 'no-such-scores.json'}"]) == 2  # before anything is encoded
    assert "no-such-scores.json" in capsys.readouterr().err
    assert cli(["eval", "model=x", "allow_missing=true"]) == 2
    assert "allow_missing: applies to benchmark=mmeb_v2" in capsys.readouterr().err


def test_two_processes_score_as_one(setup):
    tmp, words = setup
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "embedkit", "eval", *words, f"out={tmp / 'two'}"], cwd=tmp, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if not (tmp / "a" / "mmeb_v2" / "results.json").is_file():  # this test alone: the one-process run first
        assert cli(["eval", *words, f"out={tmp / 'a'}"]) == 0
    one = json.loads((tmp / "a" / "mmeb_v2" / "results.json").read_text())  # one process
    two = json.loads((tmp / "two" / "mmeb_v2" / "results.json").read_text())
    assert list(two["tasks"]) == list(one["tasks"]) and len(one["tasks"]) == 4
    for name, record in two["tasks"].items():
        assert record["metrics"] == pytest.approx(one["tasks"][name]["metrics"], abs=1e-6), name
    assert two["model"]["fingerprint"] == one["model"]["fingerprint"]
    assert "[mmeb_v2 4/4]" in proc.stdout and proc.stdout.count("[mmeb_v2 1/4]") == 1  # rank 0 reports
