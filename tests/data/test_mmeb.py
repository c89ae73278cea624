"""`embedkit data mmeb`: counts, skipped rows by reason, resumability, errors, and `embedkit fit` on the
converted shards (with a truncated tar among them)."""

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from embedkit.commands.data import main as mmeb_main
from embedkit.data.shards import decode_sample, iter_samples, list_shards
from embedkit.errors import UserError
from tests.helpers.cli import run_cli

PH = "<|image_1|>"


def _row(q=None, qi=None, p=None, pi=None, nt=None, ni=None):
    return {"qry": q, "qry_image_path": qi, "pos_text": p, "pos_image_path": pi, "neg_text": nt, "neg_image_path": ni}


def _image(root: Path, rel: str, colour, fmt="JPEG"):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path, format=fmt)


def _parquet(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {k: pa.array([r[k] for r in rows], pa.string()) for k in rows[0]}
    pq.write_table(pa.table(cols), path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """ImgCls (download layout, two parquet files + a diverse_instruction file), T2I (download layout),
    Mine.jsonl (a user's own subset) with bad rows of every kind."""
    root = tmp_path_factory.mktemp("mmeb")
    src, images = root / "MMEB-train", root / "images"
    for i in range(8):
        _image(images, f"ImgCls/{i}.jpg", (30 * i, 0, 0))
        _image(images, f"T2I/{i}.png", (0, 30 * i, 0), fmt="PNG")
    (images / "ImgCls" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    cls = [_row(f"{PH} Represent the given image for classification", f"ImgCls/{i}.jpg", f"label {i % 3}", "")
           for i in range(7)]
    cls.append(_row(f"{PH} classify", "ImgCls/gone.jpg", "label 0", ""))  # missing image
    cls.append(_row(f"{PH} classify", "ImgCls/broken.jpg", "label 0", ""))  # unreadable image
    cls.append(_row("", "", "label 1", ""))  # empty query
    _parquet(src / "ImgCls" / "original-00000-of-00002.parquet", cls[:5])
    _parquet(src / "ImgCls" / "original-00001-of-00002.parquet", cls[5:])
    _parquet(src / "ImgCls" / "diverse_instruction-00000-of-00001.parquet", cls[:2])  # another split: ignored
    t2i = [_row(f"Find an image of scene {i}", "", f"{PH} Represent the given image", f"T2I/{i}.png",
                f"{PH} Represent the given image", f"T2I/{(i + 1) % 8}.png") for i in range(8)]
    _parquet(src / "T2I" / "original-00000-of-00001.parquet", t2i)
    mine = [_row(f"question {i}", f"ImgCls/{i}.jpg", f"answer {i}", "", nt=[f"wrong {i}", f"wrong {i + 1}"])
            for i in range(5)]
    mine.append({**_row("q", "", "a", ""), "qry": 5})  # wrong type
    mine.append({**_row("q", "", "a", ""), "neg_text": {"not": "a list"}})  # wrong type
    (src / "Mine.jsonl").write_text("\n".join(json.dumps(r) for r in mine) + "\n")
    return root, src, images


def _convert(source, out, *extra):
    _, src, images = source
    return mmeb_main(["mmeb", f"src={src}", f"images={images}", f"out={out}", "shard_size=3", *extra])


def _digests(out: Path) -> dict:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.tar"))}


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    assert _convert(source, out, "workers=2") == 0  # the process pool path
    return out


def test_counts_and_skipped_by_reason(converted, capsys):
    m = json.loads((converted / "manifest.json").read_text())
    subs = m["subsets"]
    assert {k: v["count"] for k, v in subs.items()} == {"ImgCls": 7, "T2I": 8, "Mine": 5}
    assert subs["ImgCls"]["skipped"] == {"empty_text": 1, "missing_image": 1, "unreadable_image": 1}
    assert subs["Mine"]["skipped"] == {"wrong_type": 2}
    assert subs["T2I"]["skipped"] == {}
    assert m["total"]["count"] == 20 and m["total"]["skipped"]["wrong_type"] == 2
    assert len(subs["T2I"]["shards"]) == 3 and [s["count"] for s in subs["T2I"]["shards"]] == [3, 3, 2]
    for sub in subs.values():
        for shard in sub["shards"]:
            path = converted / shard["path"]
            assert shard["bytes"] == path.stat().st_size
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert subs["ImgCls"]["meta_task"] is None  # not an MMEB subset name: no meta-task
    assert not list(converted.rglob("*.tmp"))


def test_examples_keep_text_tasks_negatives_and_image_bytes(converted, source):
    _, _, images = source
    shards = list_shards(converted / "T2I")
    (key, files), *_ = list(iter_samples(shards[0]))
    ex = decode_sample(key, files)
    assert ex.task == "T2I" and ex.query.text == "Find an image of scene 0" and ex.query.image is None
    assert ex.positive.text.startswith(PH) and ex.positive.image.size == (32, 32)
    assert len(ex.negatives) == 1 and ex.negatives[0].image is not None
    assert files[f"{key}.p.png"] == (images / "T2I" / "0.png").read_bytes()  # stored as it came
    cls = [decode_sample(k, f) for s in list_shards(converted / "ImgCls") for k, f in iter_samples(s)]
    assert [e.positive.text for e in cls] == [f"label {i % 3}" for i in range(7)]  # file order kept
    assert all(e.negatives == [] for e in cls)  # empty negative columns: no negative
    (k, f), *_ = list(iter_samples(list_shards(converted / "ImgCls")[0]))
    assert f[f"{k}.q.jpg"] == (images / "ImgCls" / "0.jpg").read_bytes()
    mine = [decode_sample(k, f) for s in list_shards(converted / "Mine") for k, f in iter_samples(s)]
    assert [[n.text for n in e.negatives] for e in mine][1] == ["wrong 1", "wrong 2"]


def test_resume_after_interruption_gives_identical_shards(converted, source, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    want = _digests(converted)
    (out / "T2I" / "train-000001.tar").unlink()  # a shard that never finished...
    (out / "T2I" / ".train-000001.tar.tmp").write_bytes(b"half a shard")  # ...and its leftover
    (out / "ImgCls" / "train-000000.tar").write_bytes(b"stale")  # a shard left complete: not touched
    lines = []
    from embedkit.data.mmeb import convert

    assert convert(source[1], out, images=source[2], shard_size=3, workers=1, log=lines.append) == 0
    assert any("(7 already complete)" in line for line in lines)  # 8 shards planned, 1 rewritten
    got = _digests(out)
    assert got["T2I/train-000001.tar"] == want["T2I/train-000001.tar"]
    assert got["ImgCls/train-000000.tar"] != want["ImgCls/train-000000.tar"]  # skipped, as promised
    assert {k: v for k, v in got.items() if not k.startswith("ImgCls/train-000000")} == \
        {k: v for k, v in want.items() if not k.startswith("ImgCls/train-000000")}
    assert not list(out.rglob("*.tmp"))


def test_cap_and_subsets(source, tmp_path):
    assert _convert(source, tmp_path, "subsets=[T2I]", "cap=4") == 0
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert list(m["subsets"]) == ["T2I"] and m["subsets"]["T2I"]["count"] == 4
    assert sum(1 for _ in iter_samples(tmp_path / "T2I" / "train-000001.tar")) == 1
    assert _convert(source, tmp_path, "subsets=[T2I]", "cap=5") == 0  # shard 1 now holds 2 rows: rewritten
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["count"] for s in m["subsets"]["T2I"]["shards"]] == [3, 2]
    assert sum(1 for _ in iter_samples(tmp_path / "T2I" / "train-000001.tar")) == 2
    assert _convert(source, tmp_path, "subsets=[T2I]", "cap=3") == 0  # a lower cap: fewer shards
    assert sorted(p.name for p in (tmp_path / "T2I").iterdir()) == [".train-000000.tar.json", "train-000000.tar"]


def test_missing_column_names_column_and_file(source, tmp_path):
    src = tmp_path / "src"
    _parquet(src / "Bad" / "original-0.parquet", [{"qry": "q", "qry_image_path": "", "pos_text": "p"}])
    with pytest.raises(UserError, match=r"original-0\.parquet.*pos_image_path"):
        mmeb_main(["mmeb", f"src={src}", f"images={source[2]}", f"out={tmp_path / 'o'}"])


def test_subset_without_valid_row_exits_2_on_one_line(source, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "Void.jsonl").write_text(json.dumps(_row("q", "nowhere.jpg", "p", "")) + "\n")
    out = run_cli(["data", "mmeb", f"src={src}", f"images={source[2]}", f"out={tmp_path / 'o'}"],
                  cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "Void" in out.stderr and "no valid row" in out.stderr
    assert "missing_image" in out.stdout  # the per-subset line says why


def test_fit_trains_on_converted_shards_despite_a_truncated_tar(converted, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(converted, shards)
    cut = shards / "T2I" / "train-000000.tar"
    cut.write_bytes(cut.read_bytes()[:2500])  # one sample and a half: a truncated tar
    args = ["fit", "recipe=demo", f"data.train.shards={shards}", "trainer.max_steps=5", f"run.dir={tmp_path / 'run'}",
            "train.global_batch_size=4", "train.chunk_size=4", "data.train.num_workers=1",
            "data.train.shuffle_buffer=4", "data.train.task_batch_size=2", "data.train.num_negatives=1",
            f"data.val.shards={shards / 'Mine' / 'train-000000.tar'}", "data.val.max_queries=3",
            "tracking.enabled=false"]
    out = run_cli(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 5/5" in out.stdout
    assert "truncated" in out.stderr and "skipped" in out.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_train_yaml_lists_the_20_ind_subsets_of_eval_yaml():
    import yaml

    from embedkit.data.mmeb import TRAIN_YAML, load_train_yaml

    train = load_train_yaml(TRAIN_YAML)
    evals = yaml.safe_load((TRAIN_YAML.parent / "eval.yaml").read_text())["datasets"]
    ind = {name: spec["meta_task"] for name, spec in evals.items() if spec["split"] == "IND"}
    assert len(train) == 20 and all(spec["cap"] == 50000 for spec in train.values())
    assert {spec.get("eval", name): spec["meta_task"] for name, spec in train.items()} == ind
    from collections import Counter

    assert Counter(s["meta_task"] for s in train.values()) == {"Classification": 5, "VQA": 6, "Retrieval": 8,
                                                                 "Grounding": 1}
