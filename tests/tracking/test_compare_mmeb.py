"""``embedkit compare`` shows the MMEB-V2 leaderboard groups of several runs: from MLflow (the metrics
``summary.metric_items`` names) and from eval output folders (``runs=``), as a table and a bar chart."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from embedkit.cli import main as cli
from embedkit.eval.mmeb_v2 import summary as S
from embedkit.eval.mmeb_v2.protocol import load_protocol
from embedkit.eval.mmeb_v2.report import read_published

FIXTURES = Path(__file__).resolve().parents[1] / "eval" / "mmeb_v2" / "fixtures"


def summaries():
    """The released VLM2Vec-V2.0 v2.0.0 scores (complete) and a partial copy (ten tasks, 0.1 lower)."""
    proto = load_protocol("mmeb_v2@v2.0.0")
    pub = read_published(FIXTURES / "v2.0.0_VLM2Vec-V2.0-Qwen2VL-2B.json")
    scores = {p.name: pub.tasks[p.name][p.metric] for p in proto.tasks}
    partial = {n: s - 0.1 for n, s in list(scores.items())[:10]}  # the I-CLS tasks only
    return S.summarize(proto, scores), S.summarize(proto, partial)


def rows_of(text: str) -> dict[str, list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {"header": header, **{c[0]: c for c in ([x.strip() for x in ln.strip("|").split("|")]
                                                    for ln in lines[2:])}}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from embedkit.tracking.store import stored_name

    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("v2", artifact_location=str(tmp / "art"))
    for name, summ in zip(("full", "partial"), summaries()):
        run_id = client.create_run(exp, run_name=name).info.run_id
        client.log_batch(run_id, metrics=[Metric(stored_name(k), v, 0, 0) for k, v in S.metric_items(summ).items()])
        client.set_terminated(run_id)
    client.set_terminated(client.create_run(exp, run_name="no-mmeb").info.run_id)
    return uri


def test_mlflow_runs_get_a_groups_table_and_a_bar_chart(store, tmp_path, capsys):
    png = tmp_path / "curves.png"
    code = cli(["compare", f"tracking.uri={store}", "experiment=v2", f"plot={png}"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "mmeb_v2/overall best" not in out  # the groups have their own table, not best/final columns
    groups = rows_of(out.split("MMEB-V2 groups, percent:")[1])
    assert groups["header"][:4] == ["run", "Overall", "Image", "I-CLS"] and groups["header"][-1] == "OOD"
    assert groups["full"][1:3] == ["58.02", "64.85"] and "no-mmeb" not in groups
    full_icls = float(groups["full"][3])
    assert float(groups["partial (partial)"][1]) == pytest.approx(full_icls - 10, abs=0.01)
    assert groups["partial (partial)"][4] == ""  # no I-QA task scored: no number
    chart = tmp_path / "curves_mmeb_v2.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    assert str(chart) in err


def test_eval_folders_compare_without_a_store(tmp_path, capsys):
    for name, summ in zip(("a", "b"), summaries()):
        S.write(tmp_path / name / "mmeb_v2", summ)
    code = cli(["compare", f"runs={tmp_path / 'a'},{tmp_path / 'b'}", "format=csv", f"plot={tmp_path / 'g.png'}"])
    out, _ = capsys.readouterr()
    table = list(csv.reader(io.StringIO(out)))
    assert code == 0 and table[0][:3] == ["run", "Overall", "Image"]
    assert [r[0] for r in table[1:]] == ["a [v2.0.0]", "b (partial) [v2.0.0]"]
    assert float(table[1][1]) == pytest.approx(58.02, abs=0.005)
    assert (tmp_path / "g.png").stat().st_size > 5000
    assert cli(["compare", f"runs={tmp_path / 'missing'}"]) == 2
    assert "no mmeb_v2/summary.json under" in capsys.readouterr().err
