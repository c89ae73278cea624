"""Items with several images or a video outside training: ``Encoder.encode`` (a video file or a list of
frames, sampled by the model's frame policy), ``embedkit encode`` rows (``images``, ``video``), and an
export that records the frame policy, the image cap and the prompt format, whose ``embedkit.load``
embeds a video and a 3-image item as the trained module does. Tiny Qwen2-VL; videos written by PyAV."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import embedkit
from embedkit.data.schema import Item
from embedkit.data.video import FramePolicy, read_video
from embedkit.errors import UserError
from embedkit.export.corpus import encode_file
from embedkit.export.writer import export_model
from tests.export.test_export import reference, trained_run
from tests.helpers.images import speckled_image
from tests.helpers.videos import lossless_mp4

POLICY = FramePolicy(num_frames=4)  # the run's data.video.num_frames=4 (the default is 8: a policy not applied shows)


def _mp4(n: int = 9) -> bytes:
    frames = []
    for i in range(n):
        a = np.full((48, 64, 3), (20, 40, 60), np.uint8)
        a[10:18, 3 * i:3 * i + 8] = (255, 200, 20 * i)
        frames.append(a)
    return lossless_mp4(frames)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tmp folder, the trained module, its export folder, the video's path, the three images)."""
    tmp = tmp_path_factory.mktemp("visuals")
    run, module = trained_run(tmp, ["model.backbone=qwen2_vl", "model.backbone.tiny=true", "model.lora.enabled=true",
                                    "data.video.num_frames=4", "data.max_image_pixels=6000"])
    (tmp / "clip.mp4").write_bytes(_mp4())
    images = [speckled_image(56, 56, 0), speckled_image(84, 56, 1), speckled_image(56, 112, 2)]
    for i, im in enumerate(images):
        im.save(tmp / f"im{i}.png")
    return tmp, module, export_model(run, tmp / "export", log=lambda m: None), tmp / "clip.mp4", images


def _items(video_path, images) -> list[Item]:
    """What training saw: 4 frames, the 56x112 image (6272 pixels) resized to the 6000-pixel cap: each side x sqrt(6000 / 6272), rounded down (54x109)."""
    capped = [*images[:2], images[2].resize((54, 109), Image.Resampling.BICUBIC)]
    return [Item("<|video_1|> a square moving right", video=read_video(video_path, POLICY)),
            Item("<|image_1|> then <|image_2|> then <|image_3|>", images=capped),
            Item("just text"), Item("one image", images[0])]


def test_the_export_records_the_frame_policy_the_cap_and_the_prompt_format(setup):
    _, _, out, _, _ = setup
    inputs = json.loads((out / "embedkit.json").read_text())["inputs"]
    assert inputs["video"] == {"num_frames": 4, "sampling": "uniform", "fps": None, "min_frames": 1, "max_pixels": None}
    assert inputs["max_image_pixels"] == 6000 and "<|image_1|>" in inputs["prompt_format"]
    card = (out / "README.md").read_text()
    assert "at most 4 frames sampled uniformly" in card and "images over 6000 pixels resized" in card
    assert embedkit.load(out).decoding.policy == POLICY


def test_load_of_the_export_embeds_a_video_and_three_images_as_the_module(setup):
    _, module, out, video_path, images = setup
    items = _items(video_path, images)
    ref = reference(module, items)
    encoder = embedkit.load(out)
    for batch_size in (1, 4):
        assert (encoder.encode(items, batch_size=batch_size) - ref).abs().max().item() <= 1e-5
    # the same from parallel lists: a video file decoded with the export's policy (4 frames), a list of
    # images (the tall one resized to the export's cap)
    got = encoder.encode(texts=[it.text for it in items], images=[None, images, None, images[0]],
                         videos=[str(video_path), None, None, None], batch_size=2)
    assert (got - ref).abs().max().item() <= 1e-5
    frames = read_video(video_path, FramePolicy(num_frames=9)).images  # a list of frames, sampled by the policy
    got = encoder.encode(texts=[items[0].text], videos=[frames])
    assert (got - ref[:1]).abs().max().item() <= 1e-5
    eight = encoder.encode([Item(items[0].text, video=read_video(video_path, FramePolicy()))])
    assert (eight - ref[:1]).abs().max().item() > 1e-4  # the policy matters: 8 frames embed otherwise


def test_encode_rows_take_images_and_a_video_relative_to_the_input_file(setup):
    tmp, module, out, video_path, images = setup
    items = _items(video_path, images)
    rows = [{"text": items[0].text, "video": "clip.mp4"},
            {"text": items[1].text, "images": ["im0.png", "im1.png", "im2.png"]},
            {"text": "just text"}, {"text": "one image", "image": "im0.png"}]
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = encode_file(embedkit.load(out), path, tmp / "rows.npy", batch_size=2, part_size=3, log=lambda m: None)
    assert np.abs(np.load(got) - reference(module, items).numpy()).max() <= 1e-5


@pytest.mark.parametrize("row, message", [
    ({"text": "x", "images": ["im0.png", "gone.png"]}, "input: row 2: image not found: "),
    ({"text": "x", "video": "gone.mp4"}, "input: row 2: video file not found: "),
    ({"text": "x", "video": "bad.mp4"}, "input: row 2: "),
    ({"text": "x", "images": ["im0.png", "bad.png"]}, "input: row 2: image does not decode"),
])
def test_a_missing_or_corrupt_file_in_a_row_is_one_line_naming_the_row(setup, row, message):
    tmp, _, out, _, _ = setup
    (tmp / "bad.mp4").write_bytes(b"not a video")
    (tmp / "bad.png").write_bytes(b"not an image")
    path = tmp / "bad_rows.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError) as err:
        encode_file(embedkit.load(out), path, tmp / "bad.npy", log=lambda m: None)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_encode_refuses_images_and_a_video_in_one_entry_and_unequal_lists(setup):
    _, _, out, video_path, images = setup
    encoder = embedkit.load(out)
    with pytest.raises(ValueError, match="entry 0 has images and a video"):
        encoder.encode(texts=["x"], images=[images], videos=[str(video_path)])
    with pytest.raises(ValueError, match="1 texts, 2 images and 1 videos"):
        encoder.encode(texts=["x"], images=[None, None], videos=[None])
    with pytest.raises(UserError, match=r"encode: videos\[0\]: video file not found"):
        encoder.encode(texts=["x"], videos=["/nonexistent.mp4"])
    assert torch.is_tensor(encoder.encode(texts=["x"], images=[Image.new("RGB", (56, 56))]))


def test_eval_scores_a_corpus_task_of_videos_and_images_with_the_exports_policy(setup):
    """``data.eval.tasks``: a retrieval task whose corpus holds the video, the 3-image item and text, scored
    through the export (its 4-frame policy and 6000-pixel cap) as ``task_scores`` scores the module's own
    embeddings of what training would see; the result records the frame policy and the caps."""
    from embedkit.config.loader import compose
    from embedkit.eval.corpus_tasks import read_task, task_scores
    from embedkit.eval.run import MMEBRun

    tmp, module, out, video_path, images = setup
    folder = tmp / "task"
    folder.mkdir()
    (folder / "task.json").write_text(json.dumps({"kind": "retrieval"}))
    corpus = [{"id": "v", "text": "<|video_1|> a square moving right", "video": "../clip.mp4"},
              {"id": "i", "text": "<|image_1|> then <|image_2|> then <|image_3|>",
               "images": [f"../im{k}.png" for k in range(3)]},
              {"id": "t", "text": "just text"}]
    queries = [{"id": "q1", "text": "a moving square"}, {"id": "q2", "text": "three pictures"}]
    qrels = [{"query": "q1", "doc": "v", "grade": 2}, {"query": "q1", "doc": "t", "grade": 1},
             {"query": "q2", "doc": "i"}]
    for name, rows in (("corpus", corpus), ("queries", queries), ("qrels", qrels)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = MMEBRun(compose([f"data.eval.tasks=[{folder}]"])["data"]["eval"], chunk_size=2, quantize=[], rescore_k=None)
    result = run.evaluate(embedkit.load(out), layer=None, dim=None, out=tmp / "eval", recipe="demo",
                          log=lambda m: None)
    got = result.summary["tasks"]["task"]
    docs = _items(video_path, images)[:3]
    want = task_scores(read_task(folder), reference(module, [Item(q["text"]) for q in queries]),
                       reference(module, docs))
    assert got["score"] == pytest.approx(want["score"], abs=1e-6) and got["main"] == "ndcg_linear@5"
    assert got["metrics"] == pytest.approx(want["metrics"], abs=1e-6)
    assert got["items"]["frames"]["num_frames"] == 4 and got["items"]["max_image_pixels"] == 6000
    assert json.loads((tmp / "eval" / "summary.json").read_text())["tasks"]["task"]["kind"] == "retrieval"
    assert "| task | retrieval | 2 | 3 | ndcg_linear@5 |" in (tmp / "eval" / "summary.md").read_text()
    assert result.metrics()["eval/task/ndcg_linear@5"] == got["score"]


@pytest.mark.parametrize("backbone, words", [
    ({"name": "qwen2_vl"}, None),
    ({"name": "qwen2_vl", "prompt": "none", "append_token": None}, None),
    ({"name": "hf_text"}, None),
    ({"name": "qwen2_vl", "prompt": "chat"}, None),  # GME's layout (tests/export/test_st_qwen3_vl.py)
    ({"name": "qwen2_vl", "prompt": "chat", "append_token": "<|endoftext|>"}, None),
    ({"name": "qwen2_vl", "prompt": "bare"}, "prompt=bare"),
    ({"name": "qwen2_vl", "append_token": "<|endoftext|>"}, "append_token"),
    ({"name": "qwen3_vl", "prompt": "chat"}, None),  # Qwen3-VL-Embedding's layout (tests/export/test_st_qwen3_vl.py)
    ({"name": "qwen3_vl"}, "qwen3_vl family"),
    ({"name": "qwen3_vl", "prompt": "chat", "resize": [64, 64]}, "resize"),
    ({"name": "qwen2_5_vl"}, "qwen2_5_vl family"),
])
def test_sentence_transformers_files_are_left_out_where_they_cannot_render_the_input(backbone, words):
    from embedkit.export.st_files import unsupported

    why = unsupported({"backbone": backbone})
    assert (why is None) if words is None else (words in why and "\n" not in why)
