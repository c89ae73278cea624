"""MMEB evaluation: scoring, aggregation, the protocol with fake encoders, DDP == one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from embedkit.errors import UserError  # noqa: E402
from embedkit.eval import mmeb, retrieval  # noqa: E402
from tests.helpers import mmeb_fixture as fx  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("mmeb_eval")
    fx.build(r)
    return r


# ------------------------------------------------------------------ manifest


def test_manifest_has_the_36_mmeb_datasets():
    m = mmeb.load_manifest()
    assert len(m) == 36
    splits = [v["split"] for v in m.values()]
    assert splits.count("IND") == 20 and splits.count("OOD") == 16
    metas = [v["meta_task"] for v in m.values()]
    assert {t: metas.count(t) for t in set(metas)} == {
        "Classification": 10,
        "VQA": 10,
        "Retrieval": 12,
        "Grounding": 4,
    }
    assert all(isinstance(v["candidates"], int) and v["candidates"] >= 2 for v in m.values())
    from embedkit.data.manifests import manifest_path

    assert "2410.05160" in manifest_path("eval.yaml").read_text().split("\ndatasets:")[0]


# ------------------------------------------------------------------ pure scoring


def test_row_scores_rank_each_query_against_its_own_row():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    s = retrieval.row_scores(q, c, [0, 1, 0], [[0, 1], [1, 0, 2], [2, 0]], normalize=True)
    assert s.shape == (3, 3)
    assert torch.isinf(s[0, 2]) and torch.isinf(s[2, 2])
    torch.testing.assert_close(s[1, :3], torch.tensor([1.0, 0.0, 2**-0.5]))
    assert retrieval.hits_at_1(s).tolist() == [True, True, False]
    # without normalisation the dot product decides: the long candidate wins row 1 anyway
    raw = retrieval.row_scores(q, c, [1], [[2, 1]], normalize=False)
    assert raw.tolist() == [[1.0, 2.0]]


def test_precision_and_ranking_metrics_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1], [0.1, 0.3, 0.9]])
    # answer (column 0) ranks 1st, 2nd, 3rd
    assert retrieval.precision_at_1(scores) == {"acc": 1 / 3, "num_correct": 1, "num_pred": 3}
    m = retrieval.ranking_metrics(scores, ks=(1, 2, 3))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_ranking_metrics_do_not_depend_on_the_sign_of_the_scores():
    """torchmetrics' retrieval metrics drop an answer scored <= 0; a shift of every score must not matter."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(30, 10, generator=g)
    scores[:, 8:] = float("-inf")  # rows of 8 candidates
    rank = [sum(float(s) > float(row[0]) for s in row[:8]) for row in scores]
    m = retrieval.ranking_metrics(scores, ks=(1, 3, 8))
    assert m["recall@8"] == 1.0 and m["recall@1"] == pytest.approx(retrieval.precision_at_1(scores)["acc"])
    assert m["recall@3"] == pytest.approx(sum(r < 3 for r in rank) / 30)
    assert m["mrr"] == pytest.approx(sum(1 / (r + 1) for r in rank) / 30)
    assert retrieval.ranking_metrics(scores - 100.0, ks=(1, 3, 8)) == m


def test_aggregate_is_the_mean_over_datasets_not_over_meta_tasks():
    manifest = mmeb.load_manifest()
    per = {"ImageNet-1K": 0.6, "N24News": 0.8, "Place365": 0.1, "RefCOCO": 0.5}
    agg = retrieval.aggregate(per, manifest)
    assert agg["meta_task"] == {"Classification": pytest.approx(0.5), "Grounding": pytest.approx(0.5)}
    assert agg["IND"] == pytest.approx(0.7)  # ImageNet-1K, N24News
    assert agg["OOD"] == pytest.approx(0.3)  # Place365, RefCOCO
    assert agg["overall"] == pytest.approx(2.0 / 4)
    per["VOC2007"] = 0.9  # a third classification dataset: dataset mean != meta-task mean now
    agg = retrieval.aggregate(per, manifest)
    assert agg["overall"] == pytest.approx(2.9 / 5)
    assert agg["meta_task"]["Classification"] == pytest.approx(2.4 / 4)
    assert agg["overall"] != pytest.approx((2.4 / 4 + 0.5) / 2)
    assert agg["counts"] == {"Classification": 4, "Grounding": 1, "IND": 3, "OOD": 2, "overall": 5}
    with pytest.raises(ValueError, match="Nope"):
        retrieval.aggregate({"Nope": 1.0}, manifest)


def test_degenerate_encoder_is_flagged_by_ties():
    scores = torch.zeros(4, 10)  # a constant encoder: every candidate ties
    assert retrieval.precision_at_1(scores)["acc"] == 1.0  # the reference's argmax behaviour
    assert int(retrieval.top_ties(scores).sum()) == 4


# ------------------------------------------------------------------ the protocol on a folder


def test_perfect_encoder_scores_one_and_outputs_are_written(root, tmp_path):
    seen = []

    def encode(items):
        seen.extend(items)
        return fx.perfect_encoder(items)

    out = tmp_path / "out"
    summary = mmeb.evaluate(root, [], encode, out_dir=out)
    assert list(summary["datasets"]) == ["N24News", "RefCOCO"]  # manifest order
    for name, r in summary["datasets"].items():
        assert (r["acc"], r["num_correct"], r["num_pred"]) == (1.0, fx.ROWS, fx.ROWS), name
        assert r["details"]["candidates"] == 10
        assert r["details"]["mrr"] == pytest.approx(1.0)
        assert r["details"]["ties_at_top"] == 0
    # de-duplication: 40 distinct N24News queries, 10 labels; 60 RefCOCO queries, <= 30 images
    d = summary["datasets"]
    assert d["N24News"]["details"]["unique_queries"] == 40
    assert d["N24News"]["details"]["unique_candidates"] == 10
    assert d["RefCOCO"]["details"]["unique_candidates"] <= 30
    expected = sum(r["details"]["unique_queries"] + r["details"]["unique_candidates"] for r in d.values())
    assert len(seen) == expected
    # files: the reference's per-dataset shape, a summary, a markdown table; no temp files left
    score = json.loads((out / "N24News_score.json").read_text())
    assert score == {"acc": 1.0, "num_correct": fx.ROWS, "num_pred": fx.ROWS}
    assert json.loads((out / "summary.json").read_text())["aggregate"]["overall"] == 1.0
    md = (out / "summary.md").read_text()
    assert "| N24News | Classification | IND | 10 | 100.00 |" in md and "| overall | 2 | 100.00 |" in md
    assert sorted(p.name for p in out.iterdir()) == [
        "N24News_score.json",
        "RefCOCO_score.json",
        "summary.json",
        "summary.md",
    ]


def test_scrambled_encoder_scores_about_chance(root):
    summary = mmeb.evaluate(root, [], fx.scrambled_encoder)
    accs = [r["acc"] for r in summary["datasets"].values()]
    # chance is 1/10; 60 rows give a standard deviation of about 0.04
    assert all(a < 0.3 for a in accs), accs
    assert 0.0 < summary["aggregate"]["overall"] < 0.25


def test_aggregation_matches_a_hand_computation_on_the_folder(root):
    """Wrong on every 4th N24News query (by construction): P@1 0.75 there, 1.0 on RefCOCO."""

    def encode(items):
        out = fx.perfect_encoder(items)
        for i, it in enumerate(items):
            if it.image is not None and it.text and "news image" in it.text:
                tag = it.image.getpixel((0, 0))[0]  # the query number q (rows r with r % 40 == q)
                if tag % 4 == 0:
                    out[i] = torch.roll(out[i], 1)
        return out

    summary = mmeb.evaluate(root, ["RefCOCO", "N24News"], encode)
    wrong_rows = sum(1 for r in range(fx.ROWS) if (r % 40) % 4 == 0)
    acc_news = 1 - wrong_rows / fx.ROWS
    assert summary["datasets"]["N24News"]["acc"] == pytest.approx(acc_news)
    assert summary["datasets"]["RefCOCO"]["acc"] == 1.0
    agg = summary["aggregate"]
    assert agg["meta_task"] == {"Classification": pytest.approx(acc_news), "Grounding": 1.0}
    assert agg["IND"] == pytest.approx(acc_news) and agg["OOD"] == 1.0
    assert agg["overall"] == pytest.approx((acc_news + 1.0) / 2)


def test_validation_metrics_on_a_subset(root):
    out = mmeb.validation_metrics(fx.perfect_encoder, root, ["N24News"], max_rows=12)
    assert out == {"val/N24News/p@1": 1.0, "val/p@1": 1.0}
    seen = []
    mmeb.validation_metrics(lambda items: seen.extend(items) or fx.perfect_encoder(items), root, [], max_rows=5)
    assert len(seen) <= (5 + 10) + (5 + 30)  # the full folder has 40+10 and 60+30 distinct items


def test_shard_bounds_cover_everything_once():
    for n in (0, 1, 5, 7, 10):
        for world in (1, 2, 3):
            spans = [mmeb.shard_bounds(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_two_process_evaluation_equals_one_process(root, tmp_path):
    one = mmeb.evaluate(root, [], fx.scrambled_encoder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "helpers" / "ddp_eval.py"), str(root), str(out), str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    two = got["summary"]
    assert json.loads(json.dumps(one)) == two
    # each rank encoded a share, and together exactly the distinct items
    total = sum(r["details"]["unique_queries"] + r["details"]["unique_candidates"] for r in one["datasets"].values())
    assert sum(got["encoded_per_rank"]) == total
    assert all(0 < n < total for n in got["encoded_per_rank"])


# ------------------------------------------------------------------ user errors


def test_unknown_dataset_is_a_user_error_listing_the_available(root):
    with pytest.raises(UserError) as exc:
        mmeb.evaluate(root, ["N24News", "NotADataset"], fx.perfect_encoder)
    msg = str(exc.value)
    assert "\n" not in msg and "NotADataset" in msg and "N24News, RefCOCO" in msg


def test_missing_eval_files_is_a_user_error(root, tmp_path):
    with pytest.raises(UserError) as exc:
        mmeb.evaluate(root, ["VOC2007"], fx.perfect_encoder)
    msg = str(exc.value)
    assert "\n" not in msg and "VOC2007" in msg and "N24News, RefCOCO" in msg
    with pytest.raises(UserError, match="no MMEB eval dataset"):
        mmeb.evaluate(tmp_path, [], fx.perfect_encoder)
    with pytest.raises(UserError, match="data.eval.root"):
        mmeb.evaluate(tmp_path / "nowhere", [], fx.perfect_encoder)
    with pytest.raises(UserError, match="data.eval.root"):
        mmeb.evaluate(None, [], fx.perfect_encoder)


# ------------------------------------------------------------------ end to end: fit -> embedkit eval


def tiny_fit_args(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "recipe=demo", f"run.dir={run_dir}", f"run.name={run_dir.name}", f"data.demo.cache_dir={cache}",
        "data.demo.train_size=64", "data.demo.val_size=12", "train.global_batch_size=8", "train.chunk_size=8",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
        "data.train.num_workers=0", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_eval_cli_end_to_end_on_a_demo_checkpoint(root, tmp_path, monkeypatch):
    from embedkit.cli import main as cli

    monkeypatch.chdir(tmp_path)
    # validation during fit also scores the first rows of each eval dataset: val/<dataset>/p@1
    assert cli(["fit", *tiny_fit_args(tmp_path / "runs" / "tiny", tmp_path / "cache"), f"data.eval.root={root}",
                "data.eval.datasets=[N24News,RefCOCO]", "data.eval.val_rows=5"]) == 0
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "embedkit", "eval", f"ckpt={ckpt}", f"data.eval.root={root}",
         "data.eval.datasets=[N24News,RefCOCO]", "train.chunk_size=16"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_dir = tmp_path / "runs" / "tiny" / "eval"
    scores = {n: json.loads((out_dir / f"{n}_score.json").read_text()) for n in ("N24News", "RefCOCO")}
    for s in scores.values():
        assert set(s) == {"acc", "num_correct", "num_pred"} and s["num_pred"] == fx.ROWS
        assert s["acc"] == s["num_correct"] / fx.ROWS
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["aggregate"]["overall"] == pytest.approx((scores["N24News"]["acc"] + scores["RefCOCO"]["acc"]) / 2)
    assert "| overall | 2 |" in (out_dir / "summary.md").read_text()
    assert "overall P@1" in proc.stdout
    # the engine's loader workers and a bfloat16 model: the same items scored (float32 ranks as before)
    assert cli(["eval", f"ckpt={ckpt}", f"data.eval.root={root}", "data.eval.datasets=[N24News]", "num_workers=1",
                f"out={tmp_path / 'eval-workers'}", "tracking.enabled=false", "train.chunk_size=16"]) == 0
    again = json.loads((tmp_path / "eval-workers" / "N24News_score.json").read_text())
    assert again == scores["N24News"]
    assert cli(["eval", f"ckpt={ckpt}", f"data.eval.root={root}", "data.eval.datasets=[N24News]", "dtype=bfloat16",
                f"out={tmp_path / 'eval-bf16'}", "tracking.enabled=false"]) == 0
    assert json.loads((tmp_path / "eval-bf16" / "N24News_score.json").read_text())["num_pred"] == fx.ROWS
    # logged to the MLflow run that trained the checkpoint
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("demo")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tiny" and run.data.params["loss.name"] == "infonce"
    assert run.data.metrics["eval/N24News/p_at_1"] == pytest.approx(scores["N24News"]["acc"])
    assert run.data.metrics["eval/overall/p_at_1"] == pytest.approx(summary["aggregate"]["overall"])
    assert "val/p_at_1" in run.data.metrics
    for name in ("val/N24News/p_at_1", "val/RefCOCO/p_at_1", "val/mmeb/p_at_1"):
        assert 0.0 <= run.data.metrics[name] <= 1.0
        assert len(client.get_metric_history(run.info.run_id, name)) == 4  # before, steps 2 and 4, after
    # logged at the checkpoint's step (4 optimizer steps)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/overall/p_at_1")] == [4]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} == {"eval/summary.json", "eval/summary.md"}


def test_eval_cli_user_errors_exit_2_with_one_line(root, tmp_path, capsys):
    from embedkit.cli import main as cli

    code = cli(["eval", "ckpt=x.ckpt", f"data.eval.root={root}", "data.eval.datasets=[Nope]"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Nope" in err and "N24News, RefCOCO" in err
    code = cli(["eval", "ckpt=x.ckpt", f"data.eval.root={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no MMEB eval dataset" in err
    code = cli(["eval", f"ckpt={tmp_path / 'missing.ckpt'}", f"data.eval.root={root}"])
    assert code == 2 and "ckpt: file not found" in capsys.readouterr().err
    assert cli(["eval", f"data.eval.root={root}"]) == 2
    assert "ckpt=PATH" in capsys.readouterr().err


def test_key_items_are_costed_from_image_headers_and_decoded_one_batch_at_a_time(root, monkeypatch):
    """``KeyItems``: the engine's costs read each image's size without decoding it; an image is decoded
    when its batch is processed, and what is decoded is ``make_item``'s item."""
    from PIL import ImageFile

    from embedkit.inference import item_costs

    rows = mmeb.load_dataset(root, "RefCOCO")
    keys, _ = mmeb.unique_keys([(t, p) for r in rows for t, p in zip(r.tgt_text, r.tgt_img_path)])
    items = mmeb.KeyItems(root, keys)
    real_load, loads = ImageFile.ImageFile.load, []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self))

    class Sizes:
        def costs(self, batch):
            return [it.image.width * it.image.height for it in batch]

    sizes = item_costs(items, Sizes())
    assert not loads and len(sizes) == len(keys) > 1
    for i in (0, len(keys) - 1):
        made = mmeb.make_item(root, keys[i])
        assert sizes[i] == made.image.width * made.image.height
        assert items[i].image.tobytes() == made.image.tobytes()
    assert loads  # decoding happens on item access
