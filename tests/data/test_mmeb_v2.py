"""`embedkit data mmeb-v2`: the V2 mixture from a fixture in each source's real layout (MMEB-train parquet,
the colpali and VisRAG HF parquet with image cells, LLaVA-Hound jsonl + saved frame folders): one report of
missing files and corrupt rows with every valid row kept, frames picked as VLM2Vec picks them, the loaders'
texts, a byte-identical rerun after an interruption, and the V2 recipe training two tiny steps on it."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from embedkit.commands.data import main as data_main
from embedkit.data import mmeb_v2
from embedkit.errors import UserError

PH = "<|image_1|>"
SFT = "video/video_instruction/train/sft"


def _jpeg(colour, size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _mmeb(root: Path, subsets: list[str]):
    """Two rows per subset (an image query -> a text, a text -> an image); ImageNet_1K also a row whose
    image is missing."""
    for k, name in enumerate(subsets):
        (root / "MMEB-train" / "images" / name).mkdir(parents=True)
        for i in range(2):
            (root / "MMEB-train" / "images" / name / f"{i}.jpg").write_bytes(_jpeg((10 * k, 100 * i, 0)))
        rows = [(f"{PH} Represent the image {name}", f"images/{name}/0.jpg", f"label {k}", ""),
                (f"Find an image {name}", "", f"{PH} Represent the image", f"images/{name}/1.jpg")]
        if name == "ImageNet_1K":
            rows.append((f"{PH} gone", "images/ImageNet_1K/gone.jpg", "label", ""))
        cols = ("qry", "qry_image_path", "pos_text", "pos_image_path")
        path = root / "MMEB-train" / name / "original-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({c: [r[j] for r in rows] for j, c in enumerate(cols)}), path)


def _visdoc(root: Path):
    """colpali: 3 rows over 2 row groups (one without an answer); VisRAG: a known and an unknown source."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pages = [{"bytes": _jpeg((200, 200, 40 * i), (24, 32)), "path": f"p{i}.jpg"} for i in range(3)]
    colpali = pa.table({"query": ["what year?", "who?", "how many?"], "answer": ["1999", "", "three"],
                        "image": pa.array(pages, image), "source": ["a", "b", "c"]})
    path = root / "colpali_train_set" / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(colpali, path, row_group_size=2)
    pq.write_table(colpali, path.with_name("test-00000-of-00001.parquet"))  # another split: not read
    visrag = pa.table({"query": ["max value?", "the title"], "image": pa.array(pages[:2], image),
                       "source": ["ChartQA", "Somewhere"]})
    path = root / "VisRAG-Ret-Train-In-domain-data" / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(visrag, path)


def _turns(video: str, human: str, answer: str) -> str:
    return json.dumps({"id": f"{video}-x", "video": video, "conversations": [
        {"from": "human", "value": human}, {"from": "gpt", "value": answer}]})


def _video(root: Path):
    """vidA: 12 frames named frame_1 .. frame_12 (natural order differs from plain order); vidB: 3 frames;
    vidC: no folder. The caption file has a corrupt line 3 and a row of the missing vidC."""
    frames = root / "video" / "train_300k"
    for name, n, green in (("vidA", 12, 0), ("vidB", 3, 200)):
        (frames / name).mkdir(parents=True)
        for i in range(1, n + 1):
            (frames / name / f"frame_{i}.jpg").write_bytes(_jpeg((20 * i, green, 255 - 20 * i)))
        (frames / name / "notes.txt").write_text("not a frame")
    sft = root / SFT
    sft.mkdir(parents=True)
    (sft / "video_caption_300k.jsonl").write_text("\n".join([
        _turns("vidA", "<video>\nDescribe the video.", "a red ball rolls"),
        _turns("vidB", "<video>\nWhat happens?", "a cat sleeps"),
        '{"id": "broken", "video": "vidA", "conversations": [',
        _turns("vidC", "<video>\nDescribe.", "nothing here"),
        _turns("vidA", "<video>\nSummarise.", "the ball stops")]) + "\n")
    (sft / "video_240k_caption_15k.jsonl").write_text("\n".join([
        _turns("vidA", "<video>\nwhat colour is the ball?", "red"),
        _turns("vidB", "<video>\nis the cat awake?", "no"),
        json.dumps({"id": "no-turns", "video": "vidA"})]) + "\n")  # JSON, but not a usable row


def _sources() -> dict:
    return yaml.safe_load(mmeb_v2.SOURCES_YAML.read_text())["sources"]


@pytest.fixture(scope="module")
def v2root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm2vec_train")
    _mmeb(root, [n for n, s in _sources().items() if s["parser"] == "mmeb"])
    _visdoc(root)
    _video(root)
    return root


@pytest.fixture(scope="module")
def converted(v2root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards_v2")
    lines: list[str] = []
    assert mmeb_v2.convert(v2root, out, workers=1, shard_size=2, log=lines.append) == 0
    return out, "\n".join(lines)


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member name after the key: bytes} over the folder's shards."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, rest = member.name.split(".", 1)
                out.setdefault(key, {})[rest] = tar.extractfile(member).read()
    return out


def test_missing_frames_and_a_corrupt_row_are_reported_once_and_every_valid_row_kept(converted, v2root):
    out, log = converted
    subsets = _manifest(out)["subsets"]
    assert len(subsets) == 25
    for name in ("video_caption_300k", "video_caption_300k-video"):
        e = subsets[name]
        assert (e["expected"], e["count"]) == (5, 3)  # lines 1, 2, 5 kept; 3 corrupt; 4 without frames
        assert e["skipped"] == {"bad_json": 1, "missing_frames": 1}
        assert e["bad_rows"] == [{"file": str(v2root / SFT / "video_caption_300k.jsonl"), "line": 3,
                                  "why": e["bad_rows"][0]["why"]}] and "not JSON" in e["bad_rows"][0]["why"]
        assert sorted(int(k.rsplit("-", 1)[1]) for k in _samples(out / name)) == [1, 2, 5]
    qa = subsets["video_qa_240k"]
    assert (qa["expected"], qa["count"], qa["skipped"]) == (3, 2, {"bad_row": 1})
    assert [(b["line"], "conversations" in b["why"]) for b in qa["bad_rows"]] == [(3, True)]
    assert subsets["ImageNet_1K"]["skipped"] == {"missing_image": 1} and subsets["ImageNet_1K"]["count"] == 2
    assert (subsets["colpali_train_set"]["count"], subsets["colpali_train_set"]["skipped"]) == (2, {"empty_text": 1})
    assert subsets["visrag-indomain"]["count"] == 2
    # ONE report for the run: the frame folder and the image, the count, and the file listing all
    listed = (out / mmeb_v2.MISSING_LIST).read_text().splitlines()
    assert listed == sorted([str(v2root / "video" / "train_300k" / "vidC"),
                             str(v2root / "MMEB-train" / "images" / "ImageNet_1K" / "gone.jpg")])
    assert log.count("missing file(s)") == 1 and "2 missing file(s)" in log and str(out / mmeb_v2.MISSING_LIST) in log
    assert log.count("skipped as unusable") == 1 and "video_caption_300k.jsonl:3 (not JSON" in log
    assert log.count("video_caption_300k.jsonl:3") == 1 and log.count("vidC") == 1  # read by two sources, named once
    assert _manifest(out)["total"]["missing"] == 2
    # the source files' hashes, and the query modality known by construction
    jsonl = v2root / SFT / "video_caption_300k.jsonl"
    assert subsets["video_caption_300k"]["source_sha256"] == {str(jsonl): hashlib.sha256(jsonl.read_bytes()).hexdigest()}
    assert subsets["video_caption_300k-video"]["query_modality"] == "text"
    assert subsets["video_qa_240k"]["query_modality"] == "image"


def test_frames_are_8_picked_uniformly_by_index_in_natural_order(converted, v2root):
    out, _ = converted
    samples = _samples(out / "video_caption_300k")
    frames = v2root / "video" / "train_300k"
    by_video = {}
    for files in samples.values():
        meta = json.loads(files["json"])
        stored = [files[f"q.{n}"] for n in meta["query"]["frames"]]
        by_video[stored[0]] = stored
    natural = [frames / "vidA" / f"frame_{i}.jpg" for i in range(1, 13)]
    picks = np.linspace(0, 11, 8, dtype=int)  # VLM2Vec's sample_frames
    want_a = [natural[i].read_bytes() for i in picks]
    assert by_video[want_a[0]] == want_a  # 8, as stored on disk (no re-encode)
    want_b = [(frames / "vidB" / f"frame_{i}.jpg").read_bytes() for i in (1, 2, 3)]
    assert by_video[want_b[0]] == want_b  # fewer than 8: all of them, no padding


def test_texts_and_visuals_follow_the_authors_loaders(converted, v2root):
    out, _ = converted
    ret = [json.loads(f["json"]) for f in _samples(out / "video_caption_300k-video").values()]
    assert {m["query"]["text"] for m in ret} >= {"Find a video that contains the following visual content: "
                                                  "a red ball rolls"}
    assert {m["positive"]["text"] for m in ret} == {"Understand the content of the provided video: <|video_1|>"}
    assert all(len(m["positive"]["frames"]) in (8, 3) and m["query"]["image"] is None for m in ret)
    cap = [json.loads(f["json"]) for f in _samples(out / "video_caption_300k").values()]
    assert {m["query"]["text"] for m in cap} >= {"<|video_1|>\nDescribe the video."}
    qa = [json.loads(f["json"]) for f in _samples(out / "video_qa_240k").values()]
    assert {m["query"]["text"] for m in qa} >= {"Answer a question based on the content of a video. <|video_1|>\n"
                                                "what colour is the ball?"}
    visrag = {json.loads(f["json"])["positive"]["text"]: (json.loads(f["json"]), f)
              for f in _samples(out / "visrag-indomain").values()}
    meta, files = visrag[f"A statistical chart comparing values or analyzing trends.  {PH}"]
    assert meta["query"]["text"].endswith(" max value? ") and meta["query"]["text"].startswith("This query is")
    assert files["p.jpg"] == pq.read_table(v2root / "VisRAG-Ret-Train-In-domain-data" / "data" /
                                           "train-00000-of-00001.parquet").column("image")[0].as_py()["bytes"]
    meta, _ = visrag[f" {PH}"]  # a source without a prompt: the bare token after the empty text
    assert meta["query"]["text"] == "the title "
    colpali = {json.loads(f["json"])["positive"]["text"]: f for f in _samples(out / "colpali_train_set").values()}
    third = colpali["three"]  # the row of the second row group
    assert json.loads(third["json"])["query"]["text"] == f"{PH} how many?"
    assert third["q.jpg"] == pq.read_table(v2root / "colpali_train_set" / "data" /
                                           "train-00000-of-00001.parquet").column("image")[2].as_py()["bytes"]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_after_an_interruption_gives_byte_identical_shards(converted, v2root, tmp_path, monkeypatch):
    whole, _ = converted
    out = tmp_path / "out"
    written = []
    real = mmeb_v2.write_shard_job

    def dies_after_five(job):
        if len(written) == 5:
            raise KeyboardInterrupt  # a kill between two shards
        written.append(job["path"])
        return real(job)

    monkeypatch.setattr(mmeb_v2, "write_shard_job", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        mmeb_v2.convert(v2root, out, workers=1, shard_size=2, log=lambda _: None)
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(mmeb_v2, "write_shard_job", real)
    lines: list[str] = []
    assert mmeb_v2.convert(v2root, out, workers=1, shard_size=2, log=lines.append) == 0
    assert any("shards (5 already complete)" in line for line in lines)
    tree, want = _tree(out), _tree(whole)
    assert tree.keys() == want.keys() and tree == want


def test_missing_sources_are_named_in_one_line_before_any_work(tmp_path):
    root = tmp_path / "root"
    _video(root)
    with pytest.raises(UserError) as err:
        data_main(["mmeb-v2", f"src={root}", f"out={tmp_path / 'o'}"])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("src: 22 source(s) not found")
    assert "colpali_train_set" in msg and "visrag-indomain" in msg and "ImageNet_1K" in msg
    assert not (tmp_path / "o").exists()


def test_command_words(tmp_path):
    root = tmp_path / "root"
    _video(root)
    assert data_main(["mmeb-v2", f"src={root}", f"out={tmp_path / 'o'}", "subsets=[video_qa_240k]", "workers=1",
                      "num_frames=2"]) == 0
    frames = [json.loads(f["json"])["query"]["frames"] for f in _samples(tmp_path / "o" / "video_qa_240k").values()]
    assert sorted(len(f) for f in frames) == [2, 2]
    # cap=3: the first 3 usable rows in file order (lines 1, 2, 4; line 3 is corrupt), line 5 never read
    assert data_main(["mmeb-v2", f"src={root}", f"out={tmp_path / 'c'}", "subsets=[video_caption_300k]", "cap=3",
                      "workers=1"]) == 0
    entry = json.loads((tmp_path / "c" / "manifest.json").read_text())["subsets"]["video_caption_300k"]
    assert (entry["expected"], entry["count"], entry["skipped"]) == (4, 2, {"bad_json": 1, "missing_frames": 1})
    with pytest.raises(UserError, match="^num_frames: only data mmeb-v2"):
        data_main(["mmeb", f"src={root}", f"out={tmp_path / 'p'}", "num_frames=4"])
    with pytest.raises(UserError, match="^split: data mmeb-v2 reads the original split"):
        data_main(["mmeb-v2", f"src={root}", f"out={tmp_path / 'p'}", "split=train"])
    with pytest.raises(UserError, match="^subsets: nope not in the mixture"):
        data_main(["mmeb-v2", f"src={root}", f"out={tmp_path / 'p'}", "subsets=[nope]"])
    config = tmp_path / "mine.yaml"
    config.write_text("sources:\n  clips: {parser: llavahound_qa, annotation: a.jsonl}\n")
    with pytest.raises(UserError, match=r"^config: .*mine.yaml: source clips: llavahound_qa needs frames"):
        data_main(["mmeb-v2", f"src={root}", f"out={tmp_path / 'p'}", f"config={config}"])


# -- the V2 recipe on the converted mixture ---------------------------------------------------------------
RECIPE = "vlm2vec_v2_qwen2vl_2b"
TINY_FIT = ["model.backbone.tiny=true", "~model.backbone.path", "trainer.max_steps=2", "train.global_batch_size=4",
            "train.chunk_size=2", "data.train.task_batch_size=2", "data.train.num_workers=0",
            "data.train.shuffle_buffer=4", "model.backbone.min_pixels=3136", "model.backbone.max_pixels=12544",
            "model.backbone.dtype=float32", "trainer.precision=32", "model.backbone.gradient_checkpointing=false",
            "tracking.enabled=false"]
KIND = {"mmeb": "image", "vidore": "document", "visrag": "document", "llavahound_caption": "video",
        "llavahound_qa": "video"}


def test_recipe_mix_is_the_sourced_mixture():
    from embedkit.config.loader import compose

    mix = compose([f"recipe={RECIPE}"])["data"]["train"]["mix"]
    assert mix == {name: spec["weight"] for name, spec in _sources().items()}
    assert sum(mix.values()) == 52
    assert sum(w for n, w in mix.items() if _sources()[n]["parser"] == "mmeb") == 15
    assert compose([f"recipe={RECIPE}"])["data"]["video"]["num_frames"] == 8  # train_alltasks.yaml num_frames


def _seed_drawing_every_kind(out: Path, mix: dict) -> int:
    """The first seed whose 2 steps (4 examples in task runs of 2) draw an image, a document and a video
    source: the mixture plan is a pure function of the seed, so the two tiny steps see all three."""
    from embedkit.data.mixture import MixturePlan, source_weights
    from embedkit.data.shard_set import ShardSet
    from embedkit.data.shards import list_shards

    weights = source_weights(ShardSet(list_shards(out)), mix)
    kind = {name: KIND[spec["parser"]] for name, spec in _sources().items()}
    for seed in range(1000):
        plan = MixturePlan(weights, seed, 4, 2)
        if {kind[n] for step in (0, 1) for n in plan.step_sources(step)} == {"image", "document", "video"}:
            return seed
    raise AssertionError("no seed draws all three kinds in two steps")


def test_recipe_trains_two_tiny_steps_on_the_three_modalities(converted, tmp_path, monkeypatch, capsys):
    import torch

    from embedkit.cli import main as cli_main
    from embedkit.config.loader import compose

    out, _ = converted
    seed = _seed_drawing_every_kind(out, compose([f"recipe={RECIPE}"])["data"]["train"]["mix"])
    monkeypatch.chdir(tmp_path)
    assert cli_main(["fit", f"recipe={RECIPE}", *TINY_FIT, f"data.train.shards={out}", f"seed={seed}",
                     f"run.dir={tmp_path / 'run'}"]) == 0
    printed = capsys.readouterr()
    assert "step 2/2" in printed.out and "skipped" not in printed.out + printed.err  # every drawn example decoded
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and any("lora_" in k for k in ckpt["state_dict"])
