"""What every MMEB-V2 parser shares: the task folder's files, frame selection, and the task being built.

A parser reads one task's downloaded eval layout (docs/mmeb-v2.md "Running it") offline and returns it
as a ``corpus_tasks.CorpusTask`` (in memory, no folder written): ``moment`` kind for a ``local`` pin (each
query ranked against its own candidates), ``retrieval`` for a ``global`` one (against the whole corpus).
Rows are ``{"id", "text", "images": [path | {"bytes": ...}]}`` or ``{"id", "text", "frames": [path, ...]}``
(the frames already selected); the instruction is already joined to each text. What is missing (a folder,
a file, a frame folder, a page) is raised as ``MissingData`` naming each thing, so the runner can report
every task's gaps at once before encoding anything.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from embedkit.errors import UserError
from embedkit.eval.corpus_tasks import CorpusTask

#: frame files VLM2Vec's ``load_frames`` accepts (mmeb-v2.md section 2)
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
#: at most this many problems are named per task (a task with 1000 missing frame folders says "+N more")
SHOWN = 3


class MissingData(Exception):
    """A task's data is incomplete: ``reasons`` names the missing things (one short phrase each; the first
    ``SHOWN`` and how many more)."""

    def __init__(self, reasons: list[str]):
        more = len(reasons) - SHOWN
        self.reasons = reasons[:SHOWN] + ([f"+{more} more"] if more > 0 else [])
        super().__init__("; ".join(self.reasons))


def natural_key(name: str) -> list:
    """Sort key that orders ``frame_2`` before ``frame_10`` (natural sort, as VLM2Vec's ``load_frames``)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def join(instruction: str | None, text: str | None) -> str | None:
    """``instruction`` then ``text`` (VLM2Vec's ``process_input_text``: instruction + " " + text). The model's
    own visual tokens (``<|video_pad|>``, ``<|image_pad|>``) are dropped from the pinned strings: an embedkit
    item's visual goes in front of a text without a placeholder, where VLM2Vec puts its token."""
    inst = re.sub(r"<\|(video|image)_pad\|>\s*", "", instruction or "").strip()
    body = (text or "").strip()
    if inst and body:
        return f"{inst} {body}"
    return inst or body or None


def task_dir(root: Path, pin) -> Path:
    return Path(root) / pin.name


def annotation_files(folder: Path, split: str | None = None) -> list[Path]:
    """The HF dataset's files under ``folder`` (``*.parquet``, ``*.jsonl``; ``frames/`` and ``images/`` left
    out), those of ``split`` (a file name starting with it) when any are, in path order."""
    found = sorted(p for p in folder.rglob("*") if p.suffix in (".parquet", ".jsonl") and p.is_file()
                   and not {"frames", "images"} & set(p.relative_to(folder).parts[:-1]))
    of_split = [p for p in found if split and p.name.startswith(split)]
    return of_split or found


def read_table(path: Path) -> list[dict]:
    """The rows of one annotation file; one that does not read (truncated parquet, a line that is not JSON)
    is ``MissingData`` naming it, like a missing one."""
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid and json's JSONDecodeError are ValueErrors
        raise MissingData([f"{path} does not read ({type(exc).__name__})"]) from None


def read_rows(folder: Path, split: str | None, what: str) -> list[dict]:
    """Every row of the annotation files under ``folder``; ``MissingData`` when there are none."""
    if not folder.is_dir():
        raise MissingData([f"no folder {folder}"])
    files = annotation_files(folder, split)
    if not files:
        raise MissingData([f"no {what} file (*.parquet, *.jsonl) under {folder}"])
    return [row for path in files for row in read_table(path)]


def column(row: dict, name: str, n: int, task: str):
    """``row[name]``; a row without it is a layout error (``MissingData``: the file is not this dataset's)."""
    if name not in row:
        raise MissingData([f"row {n + 1} has no column {name!r} (is this {task}'s file?)"])
    return row[name]


def frame_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES),
                  key=lambda p: natural_key(p.name))


def saved_indices(n: int, cap: int, extract: str) -> list[int]:
    """Which of ``n`` frames VLM2Vec's extraction keeps (mmeb-v2.md section 2): ``ffmpeg`` (CLS, RET,
    MRET: ``save_frames``) ``floor(i * n / cap)`` for i < cap; ``cv2`` (the QA loaders) every
    ``max(1, n // cap)``-th frame from 0, at most ``cap`` of them (the cap on the cv2 path: our reading)."""
    if extract == "cv2":
        return list(range(0, n, max(1, n // cap)))[:cap]
    return [(i * n) // cap for i in range(cap)]


def select_frames(files: list[Path], frames_pin: dict) -> list[Path]:
    """The frames an item keeps (mmeb-v2.md section 2): stage 1 keeps at most ``max_saved`` of the saved
    files as the pin's ``extract`` path would have (``saved_indices``: only when more were extracted than
    VLM2Vec saves); stage 2 takes ``np.linspace(0, n - 1, num_frames, dtype=int)`` of those
    (``sample_frames``), all of them when fewer, with no padding."""
    from embedkit.data.video import uniform_indices

    if frames_pin.get("sampling", "uniform_index") != "uniform_index":
        raise UserError(f"protocol frames.sampling: {frames_pin['sampling']!r} is not supported (the benchmark's "
                        "frames are uniform_index: np.linspace over the saved frames)")
    n, cap = len(files), int(frames_pin.get("max_saved") or len(files) or 1)
    if n > cap:
        files = [files[i] for i in saved_indices(n, cap, frames_pin.get("extract", "ffmpeg"))]
    return [files[i] for i in uniform_indices(len(files), int(frames_pin["num_frames"]))]


class Builder:
    """A task being built: queries, the de-duplicated corpus (a row's key: its text and visuals), the
    graded relevance and, for a local task, each query's candidate list; ``missing`` collects problems."""

    def __init__(self, pin, folder: Path):
        self.pin, self.folder = pin, folder
        self.queries: list[dict] = []
        self.corpus: list[dict] = []
        self.index: dict[str, int] = {}
        self.qrels: list[dict[int, float]] = []
        self.candidates: list[list[int]] = []
        self.missing: list[str] = []

    # ---- problems

    def frames(self, folder: Path, clip: bool = False) -> list[str] | None:
        """The selected frame paths of a frame folder (as strings), or None (recorded as missing).
        ``clip``: a moment candidate, selected by the pin's ``clip_num_frames``/``clip_max_saved`` when set."""
        files = frame_files(folder)
        if not files:
            self.missing.append(f"no frames in {folder}")
            return None
        policy = dict(self.pin.frames or {"num_frames": 8})
        if clip:
            policy.update({k: policy[f"clip_{k}"] for k in ("num_frames", "max_saved") if f"clip_{k}" in policy})
        return [str(p) for p in select_frames(files, policy)]

    def image(self, path: Path) -> str | None:
        if not path.is_file():
            self.missing.append(f"image not found: {path}")
            return None
        return str(path)

    # ---- rows

    def doc(self, text: str | None, *, images: list | None = None, frames: list | None = None,
            doc_id: str | None = None) -> int:
        """The corpus index of this item (added once: equal text and visuals are one item)."""
        row = visual_row(text, images, frames)
        key = doc_id if doc_id is not None else item_key(row)
        if key not in self.index:
            self.index[key] = len(self.corpus)
            self.corpus.append({"id": key, **row})
        return self.index[key]

    def query(self, text: str | None, relevant: dict[int, float], *, images: list | None = None,
              frames: list | None = None, candidates: list[int] | None = None, query_id: str | None = None) -> None:
        row = visual_row(text, images, frames)
        self.queries.append({"id": query_id if query_id is not None else str(len(self.queries)), **row})
        self.qrels.append(relevant)
        if candidates is not None:
            self.candidates.append(candidates)

    def build(self) -> CorpusTask:
        """The task; ``MissingData`` naming the first few problems (and how many more) if there were any."""
        if self.missing:
            raise MissingData(self.missing)
        local = self.pin.scope == "local"
        return CorpusTask(self.pin.name, self.folder, "moment" if local else "retrieval", self.queries, self.corpus,
                          self.qrels, candidates=self.candidates if local else None, instructions={})


def visual_row(text: str | None, images: list | None, frames: list | None) -> dict:
    row: dict = {"text": text}
    if images:
        row["images"] = list(images)
    if frames:
        row["frames"] = list(frames)
    return row


def item_key(row: dict) -> str:
    """A row's identity: its text and visuals (image bytes by their SHA-1, paths as they are)."""
    def part(v):
        if isinstance(v, dict):
            v = v.get("bytes") or v.get("path")
        return hashlib.sha1(v).hexdigest() if isinstance(v, (bytes, bytearray)) else str(v)

    return json.dumps([row.get("text"), [part(v) for v in row.get("images", [])], row.get("frames", [])])


def answer_index(answer, options: list[str]) -> int | None:
    """The option an answer names: an int index, a letter (``"B"``), or the option's text; None if none."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer if 0 <= answer < len(options) else None
    text = str(answer).strip()
    if text.isdigit() and int(text) < len(options):
        return int(text)
    if len(text) == 1 and text.isalpha() and ord(text.upper()) - 65 < len(options):
        return ord(text.upper()) - 65
    return options.index(text) if text in options else None
