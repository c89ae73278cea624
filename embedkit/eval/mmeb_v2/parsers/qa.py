"""Video QA parsers: Video-MME, NExTQA, EgoSchema, MVBench, ActivityNetQA (mmeb-v2.md sections 1, 2, 5).

Local: each question is ranked against its own answer options. The query is the pin's instruction (VLM2Vec's
TASK_PROMPT) and the question, with the options written as each dataset's loader writes them (section 2):
Video-MME adds ``"\\n" + "\\n".join(options)`` and its candidates drop the "A. " prefix; NExTQA and MVBench
use ``qa_template`` ("\\nOptions:\\n(A) ..."); EgoSchema concatenates ``' '.join(options)`` with no separator;
ActivityNetQA appends ``"? (A) yes; (B) no."``. Frames: ``frames/<video>/`` (MVBench: ``frames/<subset>/<video>/``).
"""

from __future__ import annotations

import re
from pathlib import Path

from embedkit.eval.corpus_tasks import CorpusTask
from embedkit.eval.mmeb_v2.parsers.common import (
    Builder,
    MissingData,
    annotation_files,
    answer_index,
    column,
    join,
    read_rows,
    read_table,
    task_dir,
)


def options_block(options: list[str]) -> str:
    """VLM2Vec's ``qa_template`` options: ``"\\nOptions:\\n(A) first\\n(B) second"``."""
    return "\nOptions:\n" + "\n".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(options))


def _strip_letter(option: str) -> str:
    return re.sub(r"^[A-Z]\.\s*", "", option)


def _videomme(row: dict, n: int, name: str) -> tuple[str, list[str], object, str]:
    options = [str(o) for o in column(row, "options", n, name)]
    body = str(column(row, "question", n, name)) + "\n" + "\n".join(options)
    return body, [_strip_letter(o) for o in options], column(row, "answer", n, name), str(row.get("videoID"))


def _nextqa(row: dict, n: int, name: str) -> tuple[str, list[str], object, str]:
    options = [str(column(row, f"a{i}", n, name)) for i in range(5)]
    body = str(column(row, "question", n, name)) + options_block(options)
    return body, options, column(row, "answer", n, name), str(column(row, "video", n, name))


def _egoschema(row: dict, n: int, name: str) -> tuple[str, list[str], object, str]:
    options = [str(o) for o in column(row, "option", n, name)]
    body = str(column(row, "question", n, name)) + " ".join(options)
    return body, [_strip_letter(o) for o in options], column(row, "answer", n, name), str(column(row, "video_idx", n, name))


def _mvbench(row: dict, n: int, name: str) -> tuple[str, list[str], object, str]:
    options = [str(o) for o in column(row, "candidates", n, name)]
    body = str(column(row, "question", n, name)) + options_block(options)
    video = str(column(row, "video", n, name))
    return body, options, column(row, "answer", n, name), f"{row['subset']}/{video}"


def _activitynetqa(row: dict, n: int, name: str) -> tuple[str, list[str], object, str]:
    body = str(column(row, "question", n, name)) + "? (A) yes; (B) no."
    return body, ["yes", "no"], column(row, "answer", n, name), f"v_{column(row, 'video_name', n, name)}"


FORMATS = {"videomme": _videomme, "nextqa": _nextqa, "egoschema": _egoschema, "mvbench": _mvbench,
           "activitynetqa": _activitynetqa}


def _mvbench_rows(folder: Path, split: str | None, configs: list[str]) -> list[dict]:
    """MVBench's subset configs (the pin's ``extra.configs``; else every sub-folder), one folder each
    (``<task>/<subset>/...``): rows with ``subset`` added, subsets in the pin's order."""
    if not folder.is_dir():
        raise MissingData([f"no folder {folder}"])
    subsets = configs or sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "frames")
    files = {sub: annotation_files(folder / sub, split) if (folder / sub).is_dir() else [] for sub in subsets}
    missing = [f"no annotation file under {folder / sub}" for sub, found in files.items() if not found]
    if missing or not files:
        raise MissingData(missing or [f"no annotation file under {folder}/<subset>/"])
    return [{**row, "subset": sub} for sub, paths in files.items() for path in paths for row in read_table(path)]


def _frame_folder(b: Builder, video: str) -> Path:
    path = b.folder / "frames" / video
    return path if path.is_dir() or not Path(video).suffix else path.with_suffix("")


def video_qa(pin, root: Path) -> CorpusTask:
    folder = task_dir(root, pin)
    b = Builder(pin, folder)
    split = pin.dataset.get("split")
    rows = (_mvbench_rows(folder, split, list((pin.extra or {}).get("configs") or []))
            if pin.parser == "mvbench" else read_rows(folder, split, "annotation"))
    for n, row in enumerate(rows):
        body, options, answer, video = FORMATS[pin.parser](row, n, pin.name)
        right = answer_index(answer, options)
        if right is None:
            b.missing.append(f"row {n + 1}: answer {answer!r} names none of its {len(options)} options")
            continue
        cands = [b.doc(join(pin.candidate_instruction, o)) for o in options]
        b.query(join(pin.query_instruction, body), {cands[right]: 1.0}, frames=b.frames(_frame_folder(b, video)),
                candidates=cands)
    return b.build()
