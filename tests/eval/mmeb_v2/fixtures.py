"""A tiny MMEB-V2 eval layout written by tests: a few rows per dataset family in its HF dataset's real
column layout (mmeb-v2.md section 5), with frame folders and images, under the data root docs/mmeb-v2.md
("Running it") describes; and small protocol files derived from the shipped one.

    counts = write_layout(root)                    # {task name: queries}, every family
    path = small_protocol(tmp / "p.yaml", counts)  # the shipped v2.0.0 pins of those tasks, counts replaced
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import yaml
from PIL import Image

#: one task per parser: the task of the shipped protocol the fixture writes
TASKS = {
    "image": "N24News", "ssv2": "SmthSmthV2", "video_classification": "K700", "msrvtt": "MSR-VTT", "msvd": "MSVD",
    "didemo": "DiDeMo", "youcook2": "YouCook2", "vatex": "VATEX", "moment_retrieval": "QVHighlight",
    "momentseeker": "MomentSeeker", "videomme": "Video-MME", "nextqa": "NExTQA", "egoschema": "EgoSchema",
    "mvbench": "MVBench", "activitynetqa": "ActivityNetQA", "vidore": "ViDoRe_esg_reports_human_labeled_v2",
    "visrag": "VisRAG_ArxivQA",
}
SIDE = 56  # 56 x 56 = 3136 pixels: the pinned min_pixels, the smallest a Qwen2-VL item is


def color(seed: int) -> tuple[int, int, int]:
    return ((53 * seed) % 256, (97 * seed + 40) % 256, (31 * seed + 90) % 256)


def picture(seed: int) -> Image.Image:
    im = Image.new("RGB", (SIDE, SIDE), color(seed))
    im.paste(color(seed + 7), (seed % 30, (3 * seed) % 30, seed % 30 + 20, (3 * seed) % 30 + 20))
    return im


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    picture(seed).save(buf, format="PNG")
    return buf.getvalue()


def frames(folder: Path, seed: int, n: int = 10, suffix: str = ".jpg", pattern: str = "frame_{:04d}") -> None:
    """``n`` frames named as VLM2Vec saves them (``frame_0001.jpg``; the QA loaders' ``0001.jpeg``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        picture(seed * 13 + i).save(folder / (pattern.format(i) + suffix))


def table(path: Path, rows: list[dict]) -> None:
    """Rows as the HF dataset ships them: parquet, or JSON Lines for a ``.jsonl`` path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


# ---------------------------------------------------------------- one writer per family


def image(root: Path, name: str) -> int:
    for k in range(4):
        picture(100 + k).save(_mk(root / "images" / name / f"q{k}.jpg"))
    rows = [{"qry_text": f"<|image_1|> Represent the given news image for classification: story {k}",
             "qry_img_path": f"{name}/q{k}.jpg", "tgt_text": ["sports", "politics", "science"][k % 3:] + ["arts"],
             "tgt_img_path": [""] * (4 - k % 3)} for k in range(3)]
    table(root / name / "test.parquet", rows)
    return len(rows)


def ssv2(root: Path, name: str) -> int:
    rows = [{"video_id": f"{k}", "pos_text": f"pushing thing {k}", "neg_text": [f"pulling thing {k}", "dropping"]}
            for k in range(3)]
    for k in range(3):
        frames(root / name / "frames" / f"{k}", k, n=12)
    table(root / name / "data" / "test-00000-of-00001.parquet", rows)
    return 3


def video_classification(root: Path, name: str) -> int:
    rows = [{"video_id": f"vid{k}", "pos_text": ["abseiling", "bowling", "abseiling", "juggling"][k]} for k in range(4)]
    for k in range(4):
        frames(root / name / "frames" / f"vid{k}", 20 + k, n=70)  # more than the 64 VLM2Vec saves
    table(root / name / "data" / "test-00000-of-00001.parquet", rows)
    return 4


RET = {"msrvtt": lambda k: {"video_id": f"video{k}", "video": f"video{k}.mp4", "caption": f"a clip number {k}"},
       "msvd": lambda k: {"video_id": f"m{k}", "video": f"m{k}.avi", "caption": [f"msvd caption {k}", "unused"]},
       "didemo": lambda k: {"video": f"videos/d{k}.mp4", "caption": f"didemo scene {k}"},
       "youcook2": lambda k: {"id": f"yc{k}", "video_path": f"val/yc{k}.mp4", "sentence": f"cut onion {k}"},
       "vatex": lambda k: {"videoID": f"vx{k}", "enCap": [f"vatex caption {k}", "other"]}}
RET_FOLDER = {"msrvtt": "video_id", "msvd": "video_id", "didemo": "video", "youcook2": "id", "vatex": "videoID"}


def retrieval(root: Path, name: str, parser: str) -> int:
    rows = [RET[parser](k) for k in range(3)]
    for k, row in enumerate(rows):
        frames(root / name / "frames" / Path(str(row[RET_FOLDER[parser]])).stem, 40 + k, n=9)
    table(root / name / "data" / ("test.jsonl" if parser == "vatex" else "test-00000-of-00001.parquet"), rows)
    return 3


def moment_retrieval(root: Path, name: str) -> int:
    rows = [{"query": f"a person opens door {k}", "video_path": f"qv{k}.mp4"} for k in range(2)]
    for k in range(2):
        video = root / name / "frames" / f"qv{k}"
        frames(video / "query", 60 + k, n=20)
        frames(video / "positive_0", 62 + k, n=8)
        for j in range(3):
            frames(video / f"negative_{j}", 70 + 5 * k + j, n=8)
    table(root / name / "data" / "test-00000-of-00001.parquet", rows)
    return 2


def momentseeker(root: Path, name: str) -> int:
    clips = root / name / "frames" / "video_frames"
    rows = []
    for k, given in enumerate(["", "q/img1.jpg", "q/clip1.mp4"]):
        pos, neg = [f"clips/p{k}_{j}.mp4" for j in range(1 + k % 2)], [f"clips/n{k}_{j}.mp4" for j in range(2)]
        for j, p in enumerate(pos + neg):
            frames(clips / p.replace("/", "_").removesuffix(".mp4"), 80 + 7 * k + j, n=8)
        rows.append({"query": f"the moment {k}", "input_frames": given,
                     "positive_frames": [{"output_path": p} for p in pos],
                     "negative_frames": [{"output_path": p} for p in neg]})
    picture(99).save(_mk(root / name / "frames" / "query_q_img1.jpg"))
    frames(clips / "q_clip1", 98, n=8)
    table(root / name / "data" / "test-00000-of-00001.parquet", rows)
    return 3


def _qa_frames(root: Path, name: str, videos: list[str], seed: int) -> None:
    for k, v in enumerate(videos):
        frames(root / name / "frames" / v, seed + k, n=16, suffix=".jpeg", pattern="{:04d}")


def videomme(root: Path, name: str) -> int:
    rows = [{"question_id": f"{k}-1", "videoID": f"ytb{k}", "domain": "Knowledge", "sub_category": "Humanity",
             "question": f"What is shown {k}?", "options": ["A. a cat", "B. a dog", "C. a car", "D. a tree"],
             "answer": "ABCD"[k]} for k in range(2)]
    _qa_frames(root, name, ["ytb0", "ytb1"], 110)
    table(root / name / "videomme" / "test-00000-of-00001.parquet", rows)
    return 2


def nextqa(root: Path, name: str) -> int:
    rows = [{"video": 4000 + k, "question": f"why did the boy run {k}", "answer": k, "qid": k, "type": "CW",
             **{f"a{i}": f"answer {i}" for i in range(5)}} for k in range(2)]
    _qa_frames(root, name, ["4000", "4001"], 120)
    table(root / name / "MC" / "test-00000-of-00001.parquet", rows)
    return 2


def egoschema(root: Path, name: str) -> int:
    rows = [{"video_idx": f"ego{k}", "question_idx": f"{k}", "question": f"What did c do {k}? ",
             "option": [f"{'ABCDE'[i]}. option {i}" for i in range(5)], "answer": str(k)} for k in range(2)]
    _qa_frames(root, name, ["ego0", "ego1"], 130)
    table(root / name / "Subset" / "test-00000-of-00001.parquet", rows)
    return 2


MVBENCH_SUBSETS = ("action_sequence", "object_shuffle")


def mvbench(root: Path, name: str) -> int:
    count = 0
    for s, subset in enumerate(MVBENCH_SUBSETS):
        rows = [{"video": f"clip{k}.mp4", "question": f"What happened {k}?", "candidates": ["left", "right", "up"],
                 "answer": ["left", "right", "up"][k]} for k in range(2)]
        for k in range(2):
            frames(root / name / "frames" / subset / f"clip{k}", 140 + 3 * s + k, n=16, suffix=".jpeg", pattern="{:04d}")
        table(root / name / subset / "train-00000-of-00001.parquet", rows)
        count += len(rows)
    return count


def activitynetqa(root: Path, name: str) -> int:
    rows = [{"video_name": f"an{k}", "question": f"is the person swimming {k}", "answer": ["yes", "no"][k % 2],
             "question_id": f"q{k}"} for k in range(3)]
    _qa_frames(root, name, [f"v_an{k}" for k in range(3)], 150)
    table(root / name / "data" / "test-00000-of-00001.parquet", rows)
    return 3


def visdoc(root: Path, name: str, parser: str) -> int:
    """BEIR configs; graded qrels (one query with grades 2 and 1, as ViDoRe's human-labelled ESG set has),
    a zero-score qrel (dropped), a repeated pair (its maximum kept) and a query no qrel names (not counted)."""
    ids = [f"page{k}.jpg" for k in range(5)] if parser == "visrag" else list(range(5))
    corpus = [{"corpus-id": ids[k], "image": {"bytes": png_bytes(200 + k), "path": None}} for k in range(5)]
    queries = [{"query-id": f"q{k}", "query": f"what does page {k} say"} for k in range(4)]
    qrels = [("q0", 0, 2), ("q0", 1, 1), ("q1", 2, 1), ("q1", 3, 0), ("q2", 4, 1), ("q2", 4, 3)]
    split = "train" if parser == "visrag" else "test"
    table(root / name / "corpus" / f"{split}-00000-of-00001.parquet", corpus)
    table(root / name / "queries" / f"{split}-00000-of-00001.parquet", queries)
    table(root / name / "qrels" / f"{split}-00000-of-00001.parquet",
          [{"query-id": q, "corpus-id": ids[c], "score": s} for q, c, s in qrels])
    return 3


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_task(root: Path, parser: str) -> int:
    """Write the fixture of ``parser``'s task (``TASKS[parser]``) under ``root``; its query count."""
    name = TASKS[parser]
    if parser in RET:
        return retrieval(root, name, parser)
    if parser in ("vidore", "visrag"):
        return visdoc(root, name, parser)
    return globals()[parser](root, name)


def write_layout(root: Path, parsers=None) -> dict[str, int]:
    """Every family's fixture (or those of ``parsers``): ``{task name: query count}``."""
    return {TASKS[p]: write_task(Path(root), p) for p in (parsers or TASKS)}


def small_protocol(path: Path, counts: dict[str, int], version: str = "v2.0.0") -> Path:
    """The shipped ``version``'s pins of the tasks in ``counts`` (in its order), each ``num_queries``
    replaced by the fixture's count: a protocol file for ``protocol_from_file`` / ``protocol_file=``."""
    from embedkit.eval.mmeb_v2.protocol import PROTOCOL_DIR

    doc = yaml.safe_load((PROTOCOL_DIR / f"{version}.yaml").read_text())
    doc["tasks"] = [{**t, "num_queries": counts[t["name"]]} for t in doc["tasks"] if t["name"] in counts]
    for task in doc["tasks"]:
        if task["name"] == "MVBench":  # the fixture writes two of its 20 subset configs
            task["extra"] = {**task.get("extra", {}), "configs": list(MVBENCH_SUBSETS)}
    doc["version"] = f"{version}-fixture"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def tiny_checkpoint(path: Path, recipe: str = "demo_video") -> Path:
    """A checkpoint as ``embedkit fit`` writes it (resolved config + ``encoder.*`` weights) of ``recipe``'s
    tiny random Qwen2-VL (images and video), untrained: what ``embedkit eval ckpt=`` opens."""
    import torch

    from embedkit.config.loader import compose
    from embedkit.encoder import CHECKPOINT_PREFIX, Encoder

    cfg = compose([f"recipe={recipe}"])
    state = Encoder.from_config(cfg["model"], seed=0).state_dict()
    torch.save({"hyper_parameters": {"config": cfg}, "global_step": 0,
                "state_dict": {CHECKPOINT_PREFIX + k: v for k, v in state.items()}}, path)
    return path
