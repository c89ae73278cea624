"""``embedkit data mmeb-v2``: the VLM2Vec-V2 training mixture, from its downloaded layout to shards.

Sources (``data/mmeb/train_v2.yaml``; layout and downloads: docs/mmeb-v2-data.md), each one folder of
shards under ``out=`` and one entry of the shard set's manifest:

- the 20 MMEB-train image subsets: ``data mmeb``'s own rows, checks and writer (``data.mmeb``);
- ``colpali_train_set`` (parser ``vidore``): query ``"<|image_1|> {query}"`` with the page image, positive
  the ``answer`` text -- trained as document VQA, as VLM2Vec's ``vidore_dataset.py`` does (not as retrieval);
- ``visrag-indomain`` (``visrag``): query ``"{source prompt} {query} "`` (text only), positive
  ``"{source description}  <|image_1|>"`` with the page -- the image token AFTER the text, as VLM2Vec's
  ``visrag_dataset.py`` builds it (its eval targets put it in front);
- LLaVA-Hound ``video_caption_300k.jsonl`` in two data modes: ``caption_retrieval`` (query: the human turn,
  ``<video>`` -> ``<|video_1|>``, with the frames; positive: the caption) and ``video_retrieval`` (query:
  ``"Find a video that contains the following visual content: " + caption``; positive: ``"Understand the
  content of the provided video: <|video_1|>"`` with the frames), ``llavahound_dataset_caption.py``;
- LLaVA-Hound ``video_240k_caption_15k.jsonl`` (``llavahound_qa``): query ``"Answer a question based on the
  content of a video. "`` + the human turn with the frames; positive: the answer.

Strings, caps and weights: TIGER-AI-Lab/VLM2Vec main @ 6e1e1d4 (``src/data/dataset/*.py``,
``experiments/public/train/train_alltasks.yaml``); research: shared/research/mmeb-v2.md sections 2 and 4.

Frames: a video's saved frame folder (``train_300k/<video id>/``), its .jpg/.jpeg/.png files in natural
order, ``num_frames`` (8) of them picked uniformly by index (``video.uniform_indices``, VLM2Vec's
``np.linspace(0, n - 1, 8, dtype=int)``; all of them when fewer, no padding) and stored as a frames slot,
bytes as they came. A missing or empty folder skips the row (VLM2Vec skips it silently) as
``missing_frames``.

Everything else is ``data mmeb``'s machinery: rows checked and capped in the parent, shards planned and
written by its process pool with a sidecar each (resumable: a rerun keeps every completed shard, so an
interrupted conversion ends with the same bytes), one manifest. Missing files are collected over the whole
run and reported once at the end (the first few, a count, and ``out/missing-files.txt`` listing all); a
corrupt jsonl line or a row without the needed fields is skipped and named by file and line.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from pathlib import Path

from embedkit.data import mmeb
from embedkit.data.manifests import manifest_path
from embedkit.data.schema import VIDEO_PLACEHOLDER, image_placeholder
from embedkit.data.shard_set import write_manifest
from embedkit.errors import UserError
from embedkit.files import jsonl_lines, sha256_file, write_atomic

SOURCES_YAML = manifest_path("train_v2.yaml")
FORMAT_VERSION = 1
PARSERS = ("mmeb", "vidore", "visrag", "llavahound_caption", "llavahound_qa")
MODES = ("caption_retrieval", "video_retrieval")
MISSING_LIST = "missing-files.txt"  # beside the manifest: every missing file, one per line
HASH_CACHE = ".source-sha256.json"  # sha256 of the source files by (size, mtime): a rerun does not re-read GBs
REPORT_FIRST = 10  # missing files and bad rows named in the log (all of them: the list file, the manifest)
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")  # VLM2Vec vision_utils.py IMAGE_EXTENSIONS

# VLM2Vec main @ 6e1e1d4: llavahound_dataset_caption.py VRET_QRY_PROMPT / VRET_TGT_PROMPT, llavahound_dataset_qa.py
VRET_QUERY = "Find a video that contains the following visual content: "
VRET_TARGET = "Understand the content of the provided video: "
QA_QUERY = "Answer a question based on the content of a video. "

# VLM2Vec main @ 6e1e1d4: visrag_dataset.py query_source2prompt / target_source2prompt (by the row's `source`)
VISRAG_QUERY = {
    "NeurIPS Papers": "This query is about a research paper from NeurIPS, a leading AI/ML conference. The document "
                      "contains technical discussions, methodologies, and findings. Identify relevant papers and "
                      "sections that address the query: ",
    "Textbooks": "This query is related to a college-level textbook, which provides structured explanations, "
                 "definitions, and examples. Find the most relevant concepts or explanations that address the query: ",
    "ICML Papers": "This query is about a research paper from ICML, a leading AI/ML conference. The document contains "
                   "theoretical insights, experiments, and applications. Identify relevant papers and sections that "
                   "best answer the query: ",
    "Manuallib": "This query pertains to a product manual, which contains detailed technical specifications, usage "
                 "instructions, and troubleshooting steps. Find the most relevant section that answers the query: ",
    "ArxivQA": "This query is related to retrieving a relevant figure from an ArXiv research paper. The retrieved "
               "figure should contain scientific plots, mathematical visualizations, or experimental results that "
               "best address the query: ",
    "ChartQA": "This query is related to retrieving a relevant chart that visually represents numerical or "
               "categorical data. The retrieved chart should contain bar graphs, line charts, or other visual "
               "elements necessary to analyze trends, compare values, or extract insights related to the query: ",
    "MP-DocVQA": "This query is related to retrieving a relevant page from a multi-page document, such as reports, "
                 "invoices, or research papers. The retrieved document should contain text, tables, or structured "
                 "information necessary to answer the query: ",
    "InfoVQA": "This query is related to retrieving an infographic that visually presents statistical or factual "
               "information using charts, icons, and structured layouts. The retrieved image should contain the "
               "necessary visual elements to provide the best context for answering the query: ",
    "PlotQA": "This query relates to retrieving a relevant plot or chart that visually represents numerical data. "
              "The retrieved figure should contain the necessary information to analyze trends, compare values, or "
              "extract key insights related to the query: ",
    "SlideVQA": "This query is related to retrieving a relevant presentation slide that visually presents structured "
                "information. The retrieved slide should contain the necessary text, charts, or graphics to provide "
                "the best answer to the query: ",
}
VISRAG_TARGET = {
    "Textbooks": "A textbook page with structured educational content and explanations.",
    "ICML Papers": "A research paper from ICML, covering machine learning topics.",
    "NeurIPS Papers": "A research paper from NeurIPS on AI and ML topics.",
    "Manuallib": "A product manual page with technical specifications and instructions.",
    "InfoVQA": "An infographic with structured data, charts, and annotations.",
    "PlotQA": "A numerical data visualization, such as bar charts or line graphs.",
    "SlideVQA": "A presentation slide with text, bullet points, and diagrams.",
    "ArxivQA": "A figure from a research paper, including plots or experimental results.",
    "MP-DocVQA": "A page from a multi-page document with text or tables.",
    "ChartQA": "A statistical chart comparing values or analyzing trends.",
}


# -- the source list and the layout ------------------------------------------------------------
def load_sources(path: str | Path) -> tuple[dict[str, dict], list[str]]:
    """({source: spec}, the folder names the LLaVA-Hound clone may have) from ``train_v2.yaml``;
    ``UserError`` naming the file for an unknown parser or data mode."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config: {path} is not a file")
    doc = yaml.safe_load(path.read_text()) or {}
    sources = {str(k): dict(v or {}) for k, v in (doc.get("sources") or {}).items()}
    for name, spec in sources.items():
        _check_spec(path, name, spec)
    if not sources:
        raise UserError(f"config: {path}: no sources")
    return sources, [str(v) for v in doc.get("videos") or ["video"]]


def _check_spec(path: Path, name: str, spec: dict) -> None:
    """One line naming the file and source for an unknown parser or mode, or a key its parser needs."""
    where = f"config: {path}: source {name}:"
    if spec.get("parser") not in PARSERS:
        raise UserError(f"{where} parser {spec.get('parser')!r} is not one of {', '.join(PARSERS)}")
    if spec["parser"] == "llavahound_caption" and spec.get("mode") not in MODES:
        raise UserError(f"{where} mode {spec.get('mode')!r} is not one of {', '.join(MODES)}")
    needs = ("annotation", "frames") if spec["parser"].startswith("llavahound") else ()
    absent = [k for k in needs if not isinstance(spec.get(k), str)]
    if absent:
        raise UserError(f"{where} {spec['parser']} needs {absent[0]} (a path under src)")
    if spec.get("cap") is not None and not (isinstance(spec["cap"], int) and spec["cap"] >= 0):
        raise UserError(f"{where} cap must be a whole number >= 0, got {spec['cap']!r}")


def _select(sources: dict, subsets: list[str] | None) -> dict:
    if not subsets:
        return sources
    unknown = [s for s in subsets if s not in sources]
    if unknown:
        raise UserError(f"subsets: {', '.join(unknown)} not in the mixture ({', '.join(sources)})")
    return {s: sources[s] for s in subsets}


def _locate(root: Path, spec: dict, name: str, videos: list[str], mmeb_files: dict) -> tuple[list[Path], Path] | str:
    """(the source's files, the root its visuals are relative to), or what is missing (a path pattern)."""
    parser = spec["parser"]
    if parser == "mmeb":
        return (mmeb_files[name], Path()) if name in mmeb_files else f"{root / 'MMEB-train' / name}/original-*.parquet"
    if parser in ("vidore", "visrag"):
        folder = root / spec.get("path", name)
        files = sorted(folder.rglob("train-*.parquet")) if folder.is_dir() else []
        return (files, folder) if files else f"{folder}/**/train-*.parquet"
    for clone in videos:
        annotation = root / clone / spec["annotation"]
        if annotation.is_file():
            return [annotation], root / clone / spec["frames"]
    return str(root / videos[0] / spec["annotation"])


def _locate_all(root: Path, sources: dict, videos: list[str], images: Path) -> dict[str, tuple[list[Path], Path]]:
    """Every source's files; ONE ``UserError`` naming every missing source file before any work."""
    mmeb_dir = root / "MMEB-train"
    mmeb_files = mmeb.find_sources(mmeb_dir, "original") if mmeb_dir.is_dir() else {}
    found, missing = {}, []
    for name, spec in sources.items():
        where = _locate(root, spec, name, videos, mmeb_files)
        if isinstance(where, str):
            missing.append(f"{name} ({where})")
        else:
            found[name] = (where[0], images if spec["parser"] == "mmeb" else where[1])
    if missing:
        raise UserError(f"src: {len(missing)} source(s) not found under {root}: {'; '.join(missing)} "
                        "(docs/mmeb-v2-data.md: what to download; subsets=[...] converts some)")
    return found


# -- planning rows (in the parent: annotations only, no visual read) -------------------------------
def _turns(row: dict) -> tuple[str, str, str] | str:
    """(video id, human turn with the video placeholder, answer) of a LLaVA-Hound row, or why not."""
    video, turns = row.get("video"), row.get("conversations")
    if not isinstance(video, str) or not video.strip() or ".." in Path(video).parts or Path(video).is_absolute():
        return "no usable 'video' id"
    if not (isinstance(turns, list) and len(turns) >= 2
            and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2])):
        return "'conversations' needs two turns with a string 'value'"
    return video, turns[0]["value"].replace("<video>", VIDEO_PLACEHOLDER), turns[1]["value"]


def llavahound_entry(row: dict, spec: dict, num_frames: int) -> dict | str:
    """A planned example of a LLaVA-Hound row for the source's parser and data mode, or why not."""
    turns = _turns(row)
    if isinstance(turns, str):
        return turns
    video, human, answer = turns
    def frames(text: str) -> dict:
        return {"text": text, "frames": video, "num_frames": num_frames}
    if spec["parser"] == "llavahound_qa":
        query, positive = frames(QA_QUERY + human), {"text": answer, "image": None}
    elif spec["mode"] == "caption_retrieval":
        query, positive = frames(human), {"text": answer, "image": None}
    else:  # video_retrieval: the caption finds the video
        query, positive = {"text": VRET_QUERY + answer, "image": None}, frames(VRET_TARGET + VIDEO_PLACEHOLDER)
    return {"query": query, "positive": positive, "negatives": []}


def visdoc_entry(row: dict, parser: str, cell: list) -> dict | str:
    """A planned example of a colpali (``vidore``) or VisRAG row, its page image a parquet cell, or why not."""
    query = row.get("query")
    if not isinstance(query, str) or not query.strip():
        return "empty_text"
    page = {"cell": cell}
    if parser == "vidore":  # page + question -> answer (VQA), the token in front (vidore_dataset.py)
        answer = row.get("answer")
        if not isinstance(answer, str) or not answer.strip():
            return "empty_text"
        return {"query": {"text": f"{image_placeholder(1)} {query}", **page},
                "positive": {"text": answer, "image": None}, "negatives": []}
    source = row.get("source") if isinstance(row.get("source"), str) else ""
    prompt, target = VISRAG_QUERY.get(source, ""), VISRAG_TARGET.get(source, "")
    # visrag_dataset.py process_query: f"{prompt} {query} {token}" with an empty token for the query and an
    # empty query for the target (hence the trailing space, the double space and the token AFTER the text)
    return {"query": {"text": f"{prompt} {query} " if prompt else f"{query} ", "image": None},
            "positive": {"text": f"{target}  {image_placeholder(1)}" if target else f" {image_placeholder(1)}",
                         **page}, "negatives": []}


class Planned:
    """One source's rows as planned: ``kept`` [(index, entry)], ``seen`` rows looked at (the expected
    count), ``skipped`` by reason and ``bad`` [(file, line or row, why)] for rows that could not be used."""

    def __init__(self, cap: int):
        self.cap, self.kept, self.seen, self.skipped, self.bad = cap, [], 0, Counter(), []

    @property
    def full(self) -> bool:
        return bool(self.cap) and len(self.kept) >= self.cap

    def add(self, index: int, entry: dict | str, where: tuple[str, int], reason: str = "bad_row") -> None:
        self.seen += 1
        if isinstance(entry, dict):
            self.kept.append((index, entry))
            return
        self.skipped[entry if entry == "empty_text" else reason] += 1
        self.bad.append((*where, entry))


def plan_llavahound(spec: dict, files: list[Path], cap: int, num_frames: int) -> Planned:
    """Rows of the jsonl in file order up to the cap: a corrupt line (not JSON, not an object) is a row the
    source has -- expected, skipped as ``bad_json`` and named by its line -- never a stop; blank lines are
    no rows; bytes that are not UTF-8 are replaced (the line then fails as JSON or keeps the replacement)."""
    plan, path = Planned(cap), files[0]
    for n, row, why in jsonl_lines(path, errors="replace"):
        if plan.full:
            break
        if why is None:
            plan.add(n, llavahound_entry(row, spec, num_frames), (str(path), n))
        else:
            plan.add(n, why, (str(path), n), reason="bad_json")
    return plan


def plan_visdoc(spec: dict, files: list[Path], cap: int) -> Planned:
    """Rows of the HF parquet files (text columns only; the page stays in its file: a cell
    [file, row group, row] the writer reads)."""
    import pyarrow.parquet as pq

    plan, parser = Planned(cap), spec["parser"]
    columns = ["query", "answer"] if parser == "vidore" else ["query", "source"]
    for path in files:
        pf = pq.ParquetFile(path)
        absent = [c for c in [*columns, "image"] if c not in pf.schema_arrow.names]
        if absent:
            raise UserError(f"{path}: missing column {absent[0]!r} ({parser} needs {', '.join([*columns, 'image'])})")
        row_number = 0  # in the file, 1-based: what a bad row is named by
        for group in range(pf.num_row_groups):
            for offset, row in enumerate(pf.read_row_group(group, columns=columns).to_pylist()):
                if plan.full:
                    return plan
                row_number += 1
                plan.add(plan.seen, visdoc_entry(row, parser, [str(path), group, offset]), (str(path), row_number))
    return plan


# -- writing (in pool workers) --------------------------------------------------------------------
def _natural(name: str) -> list:
    """VLM2Vec load_frames' natural_sort_key: frame_2 before frame_10."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[str]:
    """The frame images of a saved frame folder in natural order ([] when it is missing)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted((n for n in names if os.path.splitext(n)[1].lower() in FRAME_EXTENSIONS), key=_natural)


def _load_frames(job: dict, slot: dict):
    from embedkit.data.schema import Frames, Item
    from embedkit.data.video import uniform_indices

    folder = Path(job["images"]) / slot["frames"]
    names = frame_files(folder)
    if not names:
        return "missing_frames", str(folder)
    picks = uniform_indices(len(names), slot["num_frames"]) if slot["num_frames"] else list(range(len(names)))
    images = []
    for i in picks:
        image = mmeb._load_image(folder, names[i])
        if isinstance(image, str):
            return ("missing_frames" if image == "missing_image" else "unreadable_frame"), str(folder / names[i])
        images.append(image)
    return Item(text=slot["text"], video=Frames(images=images, timestamps=None, indices=picks,
                                                 source_frames=len(names)))


@functools.lru_cache(maxsize=4)
def _row_group_images(path: str, group: int) -> list:
    """The ``image`` cells of one row group (a shard's rows are consecutive: few groups, each read once)."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=["image"]).column("image").to_pylist()


def _load_cell(slot: dict):
    from embedkit.data.schema import Item

    path, group, offset = slot["cell"]
    where = f"{path}: row group {group} row {offset}"
    try:
        value = _row_group_images(path, group)[offset]
    except (OSError, IndexError):
        return "missing_image", where
    data, name = (value.get("bytes"), value.get("path") or "") if isinstance(value, dict) else (value, "")
    if not data:
        return "missing_image", where
    image = mmeb.image_from_bytes(data, name)
    return (image, where) if isinstance(image, str) else Item(text=slot["text"], image=image)


def load_slot(job: dict, slot: dict):
    """A planned slot -> ``Item``, or (reason, path): frames from a folder, a page from a parquet cell,
    else ``data mmeb``'s image file."""
    if "frames" in slot:
        return _load_frames(job, slot)
    if "cell" in slot:
        return _load_cell(slot)
    return mmeb.load_slot(job, slot)


def write_shard_job(job: dict) -> dict:
    """``data mmeb``'s shard writer with this module's slots (module level: the pool pickles it)."""
    return mmeb.write_one(job, load=load_slot)


# -- the command ----------------------------------------------------------------------------------
QUERY_MODALITY = {"vidore": "image", "visrag": "text", "llavahound_qa": "image", "caption_retrieval": "image",
                  "video_retrieval": "text"}  # known by construction: the stream need not probe


def _plan_source(name: str, spec: dict, where: tuple[list[Path], Path], cap: int | None, num_frames: int,
                 out: Path, shard_size: int, jobs: list[dict]) -> dict:
    files, base = where
    cap = cap if cap is not None else int(spec.get("cap") or 0)
    if spec["parser"] == "mmeb":  # data mmeb's own plan: its checks, its rows, its shards
        info = mmeb._plan_subset(name, files, cap, spec.get("meta_task"), out, base, shard_size, jobs)
        return {**info, "bad": [], "spec": spec}
    if spec["parser"] in ("vidore", "visrag"):
        plan = plan_visdoc(spec, files, cap)
    else:
        plan = plan_llavahound(spec, files, cap, num_frames)
    shards = mmeb.plan_shards(name, plan.kept, spec.get("meta_task"), out, base, shard_size, jobs)
    return {"meta_task": spec.get("meta_task"), "cap": cap, "source": [str(p) for p in files],
            "skipped": plan.skipped, "shards": shards, "rows": plan.seen, "bad": plan.bad, "spec": spec}


def source_hashes(files: list[Path], out: Path) -> dict[str, str]:
    """sha256 of each source file, cached in ``out`` by (size, mtime) so a resumed run does not re-read them."""
    cache_path = out / HASH_CACHE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    result = {}
    for path in files:
        st = path.stat()
        known = cache.get(str(path))
        if not known or known[:2] != [st.st_size, st.st_mtime_ns]:
            known = cache[str(path)] = [st.st_size, st.st_mtime_ns, sha256_file(path)]
        result[str(path)] = known[2]
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(cache_path, json.dumps(cache, sort_keys=True))
    return result


def _source_entry(info: dict, plans: dict, out: Path, hashes: dict) -> tuple[dict, list[str]]:
    """A source's manifest entry (``data mmeb``'s, plus expected vs found, the parser, weight, file hashes,
    bad rows and missing files) and its missing files' paths."""
    entry = mmeb._subset_entry(info, plans, out)
    missing = [p for path in info["shards"] for p in mmeb._done(path, plans[str(path)]).get("missing", [])]
    spec = info["spec"]
    entry.update({"parser": spec["parser"], "weight": spec.get("weight"), "expected": info["rows"],
                  "source_sha256": {p: hashes[p] for p in entry["source"]},
                  "bad_rows": [{"file": f, "line": n, "why": why} for f, n, why in info["bad"]],
                  "missing": {"count": len(missing), "first": missing[:REPORT_FIRST]}})
    if spec.get("mode"):
        entry["mode"] = spec["mode"]
    modality = QUERY_MODALITY.get(spec.get("mode") or spec["parser"])
    if modality:
        entry["query_modality"] = modality
    return entry, missing


def convert(src: str | Path, out: str | Path, *, images: str | Path | None = None, subsets: list[str] | None = None,
            cap: int | None = None, num_frames: int = 8, shard_size: int = 1000, workers: int | None = None,
            config: str | Path | None = SOURCES_YAML, log=print) -> int:
    """Convert the V2 mixture under ``src`` (docs/mmeb-v2-data.md) into shards under ``out`` (the module
    docstring). ``images``: the MMEB-train image root (default ``src/MMEB-train``); ``cap``: rows per source
    (None: the config's; 0: all); ``num_frames``: frames kept per video (0: every saved frame)."""
    root, out = Path(src).expanduser(), Path(out).expanduser()
    images = Path(images).expanduser() if images else root / "MMEB-train"
    if not root.is_dir():
        raise UserError(f"src: {root} is not a folder")
    if shard_size < 1:
        raise UserError("shard_size: must be at least 1")
    sources, videos = load_sources(config or SOURCES_YAML)
    sources = _select(sources, subsets)
    located = _locate_all(root, sources, videos, images)

    jobs, planned = [], {}
    for name, spec in sources.items():
        planned[name] = info = _plan_source(name, spec, located[name], cap, num_frames, out, shard_size, jobs)
        log(f"mmeb-v2: planned {name}: {info['rows']} rows read, {len(info['shards'])} shards")  # progress
    todo = [j for j in jobs if mmeb._done(Path(j["path"]), j["plan"]) is None]
    log(f"mmeb-v2: {len(planned)} sources, {len(jobs)} shards ({len(jobs) - len(todo)} already complete) -> {out}")
    mmeb.write_jobs(todo, workers, write=write_shard_job)
    return _finish(root, out, planned, {j["path"]: j["plan"] for j in jobs}, num_frames, log)


def _finish(root: Path, out: Path, planned: dict, plans: dict, num_frames: int, log) -> int:
    """The manifest, the per-source lines, and the one report of missing files and bad rows."""
    hashes = source_hashes(sorted({Path(p) for info in planned.values() for p in info["source"]}), out)
    manifest = {"format": FORMAT_VERSION, "mixture": "mmeb-v2", "src": str(root), "num_frames": num_frames,
                "subsets": {}}
    missing: list[str] = []
    for name, info in planned.items():
        manifest["subsets"][name], lost = _source_entry(info, plans, out, hashes)
        missing += lost
    entries = manifest["subsets"].values()
    manifest["total"] = {"count": sum(e["count"] for e in entries), "expected": sum(e["expected"] for e in entries),
                         "bytes": sum(e["bytes"] for e in entries), "missing": len(set(missing)),
                         "skipped": dict(sum((Counter(e["skipped"]) for e in entries), Counter()))}
    _write_missing(out, missing)
    written = write_manifest(out, manifest)
    report(manifest, out, log)
    log(f"mmeb-v2: {manifest['total']['count']} of {manifest['total']['expected']} examples, "
        f"{manifest['total']['bytes'] / 1e6:.1f} MB; manifest {written}")
    empty = [name for name, e in manifest["subsets"].items() if e["count"] == 0]
    if empty:
        raise UserError(f"no valid row in source(s) {', '.join(empty)}: see the report above and {written}")
    return 0


def _write_missing(out: Path, missing: list[str]) -> None:
    path = out / MISSING_LIST
    if missing:
        write_atomic(path, "".join(f"{p}\n" for p in sorted(set(missing))))
    elif path.is_file():
        path.unlink()  # an earlier run's list, now resolved


def report(manifest: dict, out: Path, log=print) -> None:
    """Per source: found / expected and skips by reason; then, once for the whole run, the bad rows (file
    and line) and the missing files (the first few, the count, the list file)."""
    bad, first_missing = [], []
    for name, e in manifest["subsets"].items():
        why = ", ".join(f"{n} {r}" for r, n in e["skipped"].items()) or "none"
        log(f"  {name}: {e['count']} of {e['expected']} examples in {len(e['shards'])} shards; skipped: {why}")
        bad += [f"{b['file']}:{b['line']} ({b['why']})" for b in e["bad_rows"]]
        first_missing += e["missing"]["first"]
    # two sources may read one file (the caption jsonl in both data modes): each line or file named once
    bad, first_missing = list(dict.fromkeys(bad)), list(dict.fromkeys(first_missing))
    if bad:
        more = f" (+{len(bad) - REPORT_FIRST} more in the manifest)" if len(bad) > REPORT_FIRST else ""
        log(f"mmeb-v2: {len(bad)} row(s) skipped as unusable: {'; '.join(bad[:REPORT_FIRST])}{more}")
    count = manifest["total"]["missing"]
    if count:
        log(f"mmeb-v2: {count} missing file(s), their rows skipped: {'; '.join(first_missing[:REPORT_FIRST])}"
            f"{' ...' if count > REPORT_FIRST else ''}; all listed in {out / MISSING_LIST}")
