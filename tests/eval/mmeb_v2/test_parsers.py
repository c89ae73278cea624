"""The MMEB-V2 parsers on the fixture layout (tests/eval/mmeb_v2/fixtures.py): every family's rows read in
their HF column layout, the pinned instructions joined as VLM2Vec's loaders join them (mmeb-v2.md section 2),
frames selected 8-of-<=64 by index, visdoc qrels graded, missing data named."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedkit.errors import UserError
from embedkit.eval.mmeb_v2.parsers import MissingData, parse
from embedkit.eval.mmeb_v2.parsers.common import natural_key, select_frames
from embedkit.eval.mmeb_v2.protocol import protocol_from_file
from tests.eval.mmeb_v2 import fixtures as fx

QA = ("Given a video and a question, select the most accurate answer from the provided candidates. Return only "
      "the exact text of your chosen answer. Question:")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v2")
    counts = fx.write_layout(tmp / "data")
    protocol = protocol_from_file(fx.small_protocol(tmp / "protocol.yaml", counts))
    return tmp / "data", protocol, {pin.name: parse(pin, tmp / "data") for pin in protocol.tasks}, counts


def names(paths) -> list[str]:
    return [Path(p).name for p in paths]


def test_every_family_parses_with_its_count_and_scope(layout):
    _, protocol, tasks, counts = layout
    assert len(tasks) == len(fx.TASKS) == 17
    for pin in protocol.tasks:
        task = tasks[pin.name]
        assert len(task.queries) == counts[pin.name], pin.name
        assert (task.kind, task.candidates is None) == (("moment", False) if pin.scope == "local"
                                                        else ("retrieval", True)), pin.name
        assert all(any(g > 0 for g in rel.values()) for rel in task.qrels), pin.name


def test_frames_are_8_of_at_most_64_by_index_in_natural_order(tmp_path):
    files = [tmp_path / f"frame_{i:04d}.jpg" for i in range(1, 71)]
    # 70 saved -> 64 (floor(i*70/64)) -> linspace(0, 63, 8) = 0 9 18 27 36 45 54 63 -> files 0 9 19 29 39 49 59 68
    assert names(select_frames(files, {"num_frames": 8, "max_saved": 64})) == [
        f"frame_{i + 1:04d}.jpg" for i in (0, 9, 19, 29, 39, 49, 59, 68)]
    # the QA loaders' cv2 path: every 70 // 64 = 1st frame from 0, the first 64 -> linspace picks 0 9 18 ... 63
    assert names(select_frames(files, {"num_frames": 8, "max_saved": 64, "extract": "cv2"})) == [
        f"frame_{i + 1:04d}.jpg" for i in (0, 9, 18, 27, 36, 45, 54, 63)]
    assert names(select_frames(files[:5], {"num_frames": 8, "max_saved": 64})) == names(files[:5])  # no padding
    assert sorted(["f10.jpg", "f2.jpg", "f1.jpg"], key=natural_key) == ["f1.jpg", "f2.jpg", "f10.jpg"]
    with pytest.raises(UserError, match="frames.sampling: 'fps' is not supported"):
        select_frames(files, {"num_frames": 8, "max_saved": 64, "sampling": "fps"})


def test_video_queries_and_candidates_carry_the_pinned_strings(layout):
    _, _, tasks, _ = layout
    k700 = tasks["K700"]
    assert k700.queries[0]["text"] == "Recognize the category of the video content."
    assert names(k700.queries[0]["frames"]) == [f"frame_{i + 1:04d}.jpg" for i in (0, 9, 19, 29, 39, 49, 59, 68)]
    assert [c["text"] for c in k700.corpus] == ["abseiling", "bowling", "juggling"]  # distinct labels
    assert k700.qrels[2] == {0: 1.0}  # the third video is abseiling again
    msr = tasks["MSR-VTT"]
    assert msr.queries[1]["text"] == "Find a video that contains the following visual content: a clip number 1"
    assert msr.corpus[1]["text"] == "Understand the content of the provided video." and len(msr.corpus[1]["frames"]) == 8
    assert tasks["MSVD"].queries[0]["text"].endswith(": msvd caption 0")  # caption[0] only
    assert tasks["DiDeMo"].corpus[2]["id"] == "d2"  # basename of the video path without its extension
    ssv2 = tasks["SmthSmthV2"]
    assert [ssv2.corpus[c]["text"] for c in ssv2.candidates[1]] == ["pushing thing 1", "pulling thing 1", "dropping"]


def test_qa_prompts_follow_each_datasets_loader(layout):
    _, _, tasks, _ = layout
    mme = tasks["Video-MME"]
    assert mme.queries[1]["text"] == f"{QA} What is shown 1?\nA. a cat\nB. a dog\nC. a car\nD. a tree"
    assert [mme.corpus[c]["text"] for c in mme.candidates[1]] == ["a cat", "a dog", "a car", "a tree"]
    assert mme.qrels[1] == {mme.candidates[1][1]: 1.0}  # answer "B"
    nxt = tasks["NExTQA"]
    assert nxt.queries[0]["text"].endswith("why did the boy run 0\nOptions:\n(A) answer 0\n(B) answer 1\n(C) answer 2"
                                           "\n(D) answer 3\n(E) answer 4")
    assert tasks["EgoSchema"].queries[0]["text"].endswith("What did c do 0? A. option 0 B. option 1 C. option 2 "
                                                          "D. option 3 E. option 4")
    anet = tasks["ActivityNetQA"]
    assert anet.queries[1]["text"] == f"{QA} is the person swimming 1? (A) yes; (B) no."
    assert anet.qrels[1] == {anet.candidates[1][1]: 1.0}
    mvb = tasks["MVBench"]
    assert Path(mvb.queries[3]["frames"][0]).parts[-3:-1] == ("object_shuffle", "clip1")


def test_moments_rank_their_own_clips(layout):
    _, _, tasks, _ = layout
    qv = tasks["QVHighlight"]
    clips = [qv.corpus[c]["id"] for c in qv.candidates[0]]
    assert clips == ["frames/qv0/negative_0", "frames/qv0/negative_1", "frames/qv0/negative_2", "frames/qv0/positive_0"]
    assert qv.qrels[0] == {qv.candidates[0][3]: 1.0} and len(qv.queries[0]["frames"]) == 8
    ms = tasks["MomentSeeker"]
    text, image, video = ms.queries
    assert text["text"] == "Find the clip that corresponds to the given text: the moment 0" and "frames" not in text
    assert image["text"].startswith("Select the video clip that aligns with the given text and image:")
    assert names(image["images"]) == ["query_q_img1.jpg"]
    assert video["text"].startswith("Find the clip that corresponds to the given sentence and video segment:")
    assert len(video["frames"]) == 8
    assert len(ms.qrels[1]) == 2 and set(ms.qrels[1]) == set(ms.candidates[1][:2])  # two positives


def test_visdoc_qrels_are_graded_positive_and_deduplicated(layout):
    _, _, tasks, _ = layout
    for name in ("ViDoRe_esg_reports_human_labeled_v2", "VisRAG_ArxivQA"):
        task = tasks[name]
        assert [q["id"] for q in task.queries] == ["q0", "q1", "q2"]  # q3: no qrel, not evaluated
        assert task.qrels == [{0: 2.0, 1: 1.0}, {2: 1.0}, {4: 3.0}]  # score 0 dropped, repeated pair at its max
        assert task.queries[0]["text"] == "Find a document image that matches the given query: what does page 0 say"
        page = Path(task.corpus[0]["images"][0])  # spilled to <task>/images/ once, not held in memory
        assert len(task.corpus) == 5 and page.parent == task.folder / "images" and page.suffix == ".png"
        assert page.read_bytes() == fx.png_bytes(200)
    assert tasks["VisRAG_ArxivQA"].corpus[0]["id"] == "page0.jpg"


def test_missing_annotations_frames_and_columns_are_named(layout, tmp_path):
    root, protocol, _, _ = layout
    with pytest.raises(MissingData, match="no folder .*MSR-VTT"):
        parse(protocol.task("MSR-VTT"), tmp_path)
    fx.write_layout(tmp_path, ["msrvtt", "moment_retrieval", "visrag"])
    for k in (0, 2):
        for f in (tmp_path / "MSR-VTT" / "frames" / f"video{k}").iterdir():
            f.unlink()
    with pytest.raises(MissingData) as err:
        parse(protocol.task("MSR-VTT"), tmp_path)
    assert len(err.value.reasons) == 2 and all("no frames in" in r for r in err.value.reasons)
    import shutil

    shutil.rmtree(tmp_path / "VisRAG_ArxivQA" / "qrels")
    with pytest.raises(MissingData, match="no folder .*qrels"):
        parse(protocol.task("VisRAG_ArxivQA"), tmp_path)
    shard = next((tmp_path / "QVHighlight").rglob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated by an interrupted download
    with pytest.raises(MissingData, match=r"test-00000-of-00001.parquet does not read \(ArrowInvalid\)"):
        parse(protocol.task("QVHighlight"), tmp_path)
    fx.table(shard, [{"question": "x", "video_path": "qv0.mp4"}])
    with pytest.raises(MissingData, match="row 1 has no column 'query'"):
        parse(protocol.task("QVHighlight"), tmp_path)
