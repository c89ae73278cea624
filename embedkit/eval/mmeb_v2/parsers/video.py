"""Video classification, video retrieval and moment retrieval parsers (mmeb-v2.md sections 1, 2 and 5).

Each reads the task's annotation rows (the HF dataset's columns, section 5's table) and its frames under
``<task>/frames/`` (the frame root of VLM2Vec's ``video.yaml``), selecting each item's frames by the pin
(``common.select_frames``). Sources per family: ``ssv2_dataset.py``, ``video_classification_utils.py``,
``msrvtt/msvd/didemo/youcook2/vatex_dataset.py``, ``moment_retrieval_datasets.py``, ``momentseeker_dataset.py``
of VLM2Vec (paths as section 2 cites them).
"""

from __future__ import annotations

from pathlib import Path

from embedkit.eval.corpus_tasks import CorpusTask
from embedkit.eval.mmeb_v2.parsers.common import Builder, column, join, natural_key, read_rows, task_dir


def _start(pin, root: Path) -> tuple[Builder, list[dict]]:
    folder = task_dir(root, pin)
    return Builder(pin, folder), read_rows(folder, pin.dataset.get("split"), "annotation")


def ssv2(pin, root: Path) -> CorpusTask:
    """SmthSmthV2: local; the row's ``pos_text`` then its ``neg_text`` list are its candidates."""
    b, rows = _start(pin, root)
    for n, row in enumerate(rows):
        frames = b.frames(b.folder / "frames" / str(column(row, "video_id", n, pin.name)))
        labels = [column(row, "pos_text", n, pin.name), *column(row, "neg_text", n, pin.name)]
        cands = [b.doc(join(pin.candidate_instruction, t)) for t in labels]
        b.query(join(pin.query_instruction, None), {cands[0]: 1.0}, frames=frames, candidates=cands)
    return b.build()


def video_classification(pin, root: Path) -> CorpusTask:
    """HMDB51, UCF101, K700, Breakfast: global over the label set. VLM2Vec takes the labels from its
    ``VIDEOCLS_LABEL_MAPPING``; here from ``<task>/labels.txt`` (one per line) when present, else the
    distinct ``pos_text`` of the rows in first-seen order (a subsample may not name every class:
    docs/mmeb-v2.md)."""
    b, rows = _start(pin, root)
    labels_file = b.folder / "labels.txt"
    if labels_file.is_file():
        for label in filter(None, (s.strip() for s in labels_file.read_text().splitlines())):
            b.doc(join(pin.candidate_instruction, label), doc_id=label)
    for n, row in enumerate(rows):
        label = str(column(row, "pos_text", n, pin.name))
        if labels_file.is_file() and label not in b.index:
            b.missing.append(f"label {label!r} of row {n + 1} is not in {labels_file}")
            continue
        target = b.doc(join(pin.candidate_instruction, label), doc_id=label)
        frames = b.frames(b.folder / "frames" / str(column(row, "video_id", n, pin.name)))
        b.query(join(pin.query_instruction, None), {target: 1.0}, frames=frames)
    return b.build()


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


#: retrieval family -> (the column naming the frame folder, how the folder name is made, the caption column)
RETRIEVAL = {
    "msrvtt": ("video_id", str, "caption"),
    "msvd": ("video_id", str, "caption"),          # a list: only [0] is used (msvd_dataset.py)
    "didemo": ("video", lambda v: Path(str(v)).stem, "caption"),
    "youcook2": ("id", str, "sentence"),
    "vatex": ("videoID", str, "enCap"),            # a list: only [0]
}


def video_retrieval(pin, root: Path) -> CorpusTask:
    """MSR-VTT, MSVD, DiDeMo, YouCook2, VATEX: text -> video, global over every video of the rows."""
    key, folder_of, caption = RETRIEVAL[pin.parser]
    b, rows = _start(pin, root)
    for n, row in enumerate(rows):
        name = folder_of(column(row, key, n, pin.name))
        frames = b.frames(b.folder / "frames" / name)
        target = b.doc(join(pin.candidate_instruction, None), frames=frames, doc_id=name)
        b.query(join(pin.query_instruction, str(_first(column(row, caption, n, pin.name)))), {target: 1.0})
    return b.build()


def moment_retrieval(pin, root: Path) -> CorpusTask:
    """QVHighlight, Charades-STA: local; the query's frames from ``<video>/query/``, its candidates every
    other sub-folder of ``<video>/`` (natural order), the relevant one the folder named ``positive*``."""
    b, rows = _start(pin, root)
    for n, row in enumerate(rows):
        video = b.folder / "frames" / Path(str(column(row, "video_path", n, pin.name))).stem
        clips = sorted((p for p in video.iterdir() if p.is_dir() and p.name != "query"),
                       key=lambda p: natural_key(p.name)) if video.is_dir() else []
        if not clips:
            b.missing.append(f"no clip folders in {video}")
            continue
        cands = [b.doc(join(pin.candidate_instruction, None), frames=b.frames(c, clip=True),
                       doc_id=str(c.relative_to(b.folder))) for c in clips]
        relevant = {c: 1.0 for c, p in zip(cands, clips) if p.name.startswith("positive")}
        if not relevant:
            b.missing.append(f"no positive* clip folder in {video}")
        b.query(join(pin.query_instruction, str(column(row, "query", n, pin.name))), relevant,
                frames=b.frames(video / "query"), candidates=cands)
    return b.build()


def _seeker_instruction(pin, kind: str) -> str | None:
    """MomentSeeker's query instruction by the kind of ``input_frames`` (momentseeker_dataset.py): the pin's
    ``query_instruction`` for text, ``extra.query_instruction_image`` / ``_video`` for the others."""
    return pin.query_instruction if kind == "text" else (pin.extra or {}).get(f"query_instruction_{kind}")


def _clip_folder(frames: Path, path: str) -> Path:
    """``video_frames/<path with '/' -> '_' minus .mp4>/`` (momentseeker_dataset.py)."""
    return frames / "video_frames" / path.replace("/", "_").removesuffix(".mp4")


def momentseeker(pin, root: Path) -> CorpusTask:
    """MomentSeeker: local; the query is text, text + image or text + video (``input_frames``), candidates
    every ``positive_frames`` then ``negative_frames`` clip, several positives possible."""
    b, rows = _start(pin, root)
    frames_root = b.folder / "frames"
    for n, row in enumerate(rows):
        given = str(column(row, "input_frames", n, pin.name) or "")
        kind = "video" if given.endswith(".mp4") else "image" if given else "text"
        pos = [str(c["output_path"]) for c in column(row, "positive_frames", n, pin.name)]
        neg = [str(c["output_path"]) for c in column(row, "negative_frames", n, pin.name)]
        cands = [b.doc(join(pin.candidate_instruction, None), frames=b.frames(_clip_folder(frames_root, p)),
                       doc_id=p) for p in pos + neg]
        visual = {"frames": b.frames(_clip_folder(frames_root, given))} if kind == "video" else \
            {"images": [b.image(frames_root / f"query_{given.replace('/', '_')}")]} if kind == "image" else {}
        text = join(_seeker_instruction(pin, kind), str(column(row, "query", n, pin.name)))
        b.query(text, {c: 1.0 for c in cands[: len(pos)]}, candidates=cands, **visual)
    return b.build()
