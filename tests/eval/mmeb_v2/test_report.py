"""report.compare: our results beside a released VLM2Vec score file, each task's gap and the pins that
differ (the issue's acceptance: a changed pin is named for the tasks it affects)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from embedkit.errors import UserError
from embedkit.eval.mmeb_v2 import report as R
from embedkit.eval.mmeb_v2.protocol import Protocol, load_protocol

FIXTURES = Path(__file__).parent / "fixtures"
V20, V21 = FIXTURES / "v2.0.0_VLM2Vec-V2.0-Qwen2VL-2B.json", FIXTURES / "v2.1_VLM2Vec-V2.0-Qwen2VL-2B.json"


def results_like(published: Path, proto: Protocol, shift: float = 0.0, embed: bool = False) -> dict:
    """A run's results.json as the runner writes it, its scores taken from a released file (+ shift)."""
    pub = R.read_published(published)
    tasks = {}
    for pin in proto.tasks:
        entry = pub.tasks[pin.name]
        tasks[pin.name] = {"task": pin.name, "metric": pin.metric, "score": entry[pin.metric] + shift,
                           "num_queries": entry["num_data"], "task_fingerprint": pin.fingerprint()}
    head = proto.to_dict() if embed else proto.header()
    return {"protocol": head, "partial": False, "missing": [], "tasks": tasks}


def by_task(rows):
    return {r.task: r for r in rows}


def test_the_same_protocol_and_scores_give_zero_gaps():
    proto = load_protocol("mmeb_v2@v2.1")
    rows = R.compare(results_like(V21, proto), V21, "mmeb_v2@v2.1")
    assert len(rows) == 76 and {r.status for r in rows} == {"same protocol"}
    assert all(abs(r.gap) < 1e-9 and r.differs == [] for r in rows)


def test_against_v2_0_0_the_changed_tasks_are_named_with_their_pins():
    proto = load_protocol("mmeb_v2@v2.1")
    rows = by_task(R.compare(results_like(V21, proto, shift=0.01), V20, None))  # their version guessed
    assert rows["ImageNet-1K"].status == "same protocol" and rows["ImageNet-1K"].gap == pytest.approx(1.0)
    assert rows["MomentSeeker"].differs == ["count", "dataset"]
    assert (rows["MomentSeeker"].our_count, rows["MomentSeeker"].their_count) == (1602, 1800)
    assert rows["ViDoSeek-page"].differs == ["dataset"] and rows["MMLongBench-page"].differs == ["dataset"]
    assert rows["ViDoSeek-doc"].status == "only theirs" and rows["ViDoSeek-doc"].ours is None
    assert rows["ViDoSeek-doc"].theirs == pytest.approx(80.18406693375459)
    assert sum(r.status == "protocols differ" for r in rows.values()) == 3


@pytest.mark.parametrize("task,change,pin", [
    ("MSR-VTT", {"query_instruction": "Find a video:"}, "instruction"),
    ("K700", {"frames": {"num_frames": 16, "sampling": "uniform_index", "max_saved": 64}}, "frames"),
    ("ViDoRe_docvqa", {"pixels": {"min_pixels": 3136, "max_pixels": 602112}}, "caps"),
    ("VisRAG_ChartQA", {"dataset": {"hf_path": "openbmb/VisRAG-Ret-Test-ChartQA", "config": None, "split": "train",
                                    "revision": "0123abc", "files": {}}}, "revision"),
    ("ViDoRe_arxivqa", {"metric": "hit@1"}, "metric"),
    ("MomentSeeker", {"extra": {"query_instruction_image": "x", "query_instruction_video": "y"}}, "instruction"),
])
def test_a_changed_pin_changes_the_fingerprint_and_is_named(task, change, pin):
    shipped = load_protocol("mmeb_v2@v2.1")
    edited = Protocol(shipped.benchmark, shipped.version, tuple(
        dataclasses.replace(t, **change) if t.name == task else t for t in shipped.tasks))
    assert edited.fingerprint() != shipped.fingerprint()
    ours = results_like(V21, edited, embed=True)
    rows = by_task(R.compare(ours, V21, "mmeb_v2@v2.1"))
    assert rows[task].differs == [pin] and rows[task].status == "protocols differ"
    assert [r.task for r in rows.values() if r.differs] == [task]


def test_a_partial_run_and_an_unavailable_published_task_are_told_apart(tmp_path):
    proto = load_protocol("mmeb_v2@v2.1")
    ours = results_like(V21, proto)
    del ours["tasks"]["K700"]
    doc = json.loads(V21.read_text())
    doc["metrics"]["video"]["UCF101"] = "FILE_N/A"
    (tmp_path / "theirs.json").write_text(json.dumps(doc))
    rows = by_task(R.compare(ours, tmp_path / "theirs.json", "mmeb_v2@v2.1"))
    assert (rows["K700"].status, rows["K700"].ours, rows["K700"].gap) == ("missing in ours", None, None)
    assert (rows["UCF101"].status, rows["UCF101"].theirs) == ("missing in theirs", None)
    assert R.read_published(tmp_path / "theirs.json").unavailable == ["UCF101"]


def test_results_without_embedded_pins_must_match_the_shipped_fingerprint():
    proto = load_protocol("mmeb_v2@v2.1")
    ours = results_like(V21, proto)
    ours["protocol"]["fingerprint"] = "f" * 64
    with pytest.raises(UserError, match="not the shipped v2.1"):
        R.compare(ours, V21, "mmeb_v2@v2.1")


def test_writers_and_bad_files(tmp_path):
    proto = load_protocol("mmeb_v2@v2.1")
    ours = results_like(V21, proto)
    ours["tasks"]["ViDoRe_arxivqa"]["ndcg_linear@5_vlm2vec"] = 0.5
    rows = R.compare(ours, V20, "mmeb_v2@v2.0.0")
    md = R.to_markdown(rows, "ours vs VLM2Vec-V2.0")
    assert "| MomentSeeker | V-MRET | 42.88 | 40.83 | +2.05 | hit@1 / hit@1 | 1602 / 1800 | count, dataset |" in md
    assert "| ViDoRe_arxivqa | ViDoRe-V1 | 78.87 | 80.58 | -1.70 |" in md and "| 50.00 | same protocol |" in md
    assert "rows: same protocol 73, protocols differ 3, only theirs 2" in md
    doc = json.loads(R.to_json(rows, {"theirs": str(V20)}))
    assert len(doc["rows"]) == 78 and doc["rows"][0]["task"] == "ImageNet-1K"
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(UserError, match="not a VLM2Vec score file"):
        R.read_published(tmp_path / "x.json")
    with pytest.raises(UserError, match="not found"):
        R.read_published(tmp_path / "none.json")


def test_the_version_of_a_released_file_is_guessed():
    assert [R.guess_version(R.read_published(FIXTURES / f"{v}_VLM2Vec-V2.0-Qwen2VL-2B.json"))
            for v in ("v2.0.0", "v2.0.1", "v2.1")] == ["v2.0.0", "v2.0.1", "v2.1"]


def test_the_report_verb_reads_a_run_folder_and_writes_the_table(tmp_path, capsys):
    from embedkit import cli

    proto = load_protocol("mmeb_v2@v2.1")
    (tmp_path / "run" / "mmeb_v2").mkdir(parents=True)
    (tmp_path / "run" / "mmeb_v2" / "results.json").write_text(json.dumps(results_like(V21, proto)))
    code = cli.main(["report", str(V20), f"results={tmp_path / 'run'}", f"out={tmp_path / 'r.md'}"])
    out = capsys.readouterr().out
    assert code == 0 and "protocol v2.0.0 (guessed from the file)" in out and "| MomentSeeker |" in out
    # the leaderboard numbers of both sides, each under its own protocol: v2.1 (76 tasks) vs v2.0.0 (78)
    assert "| ours [76 tasks] | 59.01 | 64.92 |" in out and "| theirs [78 tasks] | 58.02 | 64.85 |" in out
    assert "| gap | +0.98 | +0.07 |" in out  # the unrounded difference (59.007 - 58.022)
    assert (tmp_path / "r.md").read_text() == out
    assert cli.main(["report", str(V21), f"results={tmp_path / 'run'}", "format=json", "protocol=mmeb_v2@v2.1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["theirs"]["protocol"]["version"] == "v2.1" and len(doc["rows"]) == 76
    assert doc["groups"]["ours"]["Overall"] == pytest.approx(doc["groups"]["theirs"]["Overall"])
    assert cli.main(["report", str(V21), f"results={tmp_path / 'nothing'}"]) == 2
    assert "no mmeb_v2/results.json under" in capsys.readouterr().err
