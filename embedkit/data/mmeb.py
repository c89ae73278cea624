"""``embedkit data mmeb``: MMEB-train (parquet or jsonl) -> per-subset WebDataset shards + a manifest.

Source layouts accepted under ``src=`` (columns ``qry``, ``qry_image_path``, ``pos_text``,
``pos_image_path`` and optionally ``neg_text``, ``neg_image_path``; image paths relative to
``images=``):

    <src>/<subset>/<split>-*.parquet     the MMEB-train download (split: original, diverse_instruction, train)
    <src>/<subset>.parquet               a user's own subset
    <src>/<subset>.jsonl                 the same, one JSON object per line

Output: ``<out>/<subset>/train-000000.tar ...`` (the sample layout of ``embedkit.data.shards``; the
task of every example is its subset name, the manifest gives its meta-task) and the shard set's
manifest (``data.shard_set``) with counts, bytes and a sha256 digest per shard, and skipped rows by reason.

How it scales: the parent reads the tables (columns only, cheap) and applies the row checks that need
no image; the cap (``cap=``, or the subset's ``cap`` in ``data/mmeb/train.yaml``) takes the first
N rows that pass them, in file order (as VLM2Vec takes the first N rows). Shards are planned over
those rows and written by a process pool (bounded by cores): each job reads its images, skips the
ones missing or unreadable, and writes its shard atomically, with a sidecar ``.<shard>.json``
holding its counts. A re-run skips every shard whose tar and sidecar exist (resumable), so an
interrupted conversion finishes with the same bytes it would have had. Image bytes are stored as
they came (``ImageBytes``), never re-encoded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from embedkit.console import interactive
from embedkit.errors import UserError
from embedkit.files import read_jsonl, sha256_file, write_atomic

REQUIRED = ("qry", "qry_image_path", "pos_text", "pos_image_path")
OPTIONAL = ("neg_text", "neg_image_path")
REASONS = ("wrong_type", "empty_text", "missing_image", "unreadable_image")
SPLITS = ("original", "diverse_instruction", "train")
FORMAT_VERSION = 1
from embedkit.data.manifests import manifest_path
from embedkit.data.shard_set import write_manifest

TRAIN_YAML = manifest_path("train.yaml")


# -- reading sources --------------------------------------------------------------------------
def find_sources(src: Path, split: str) -> dict[str, list[Path]]:
    """subset -> its source files (sorted), from either layout."""
    out: dict[str, list[Path]] = {}
    for child in sorted(src.iterdir()):
        if child.is_dir():
            files = sorted(child.glob(f"{split}-*.parquet"))
            if files:
                out[child.name] = files
        elif child.suffix in (".parquet", ".jsonl"):
            out.setdefault(child.stem, []).append(child)
    return out


def read_rows(path: Path) -> list[dict]:
    """Rows of one file as dicts of the MMEB columns; UserError naming a missing column and the file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        _check_columns(names, path)
        table = pq.read_table(path, columns=[c for c in REQUIRED + OPTIONAL if c in names])
        return table.to_pylist()
    rows = read_jsonl(path, "data")
    if rows:
        _check_columns(set().union(*(r.keys() for r in rows)), path)
    return rows


def _check_columns(names, path: Path) -> None:
    for col in REQUIRED:
        if col not in names:
            raise UserError(f"{path}: missing column {col!r} (MMEB columns: {', '.join(REQUIRED + OPTIONAL)})")


def _as_list(value) -> list | None:
    """A negative column value as a list of str|None (a single value or a list); None if the type is wrong."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, str) for v in value):
        return list(value)
    return None


def check_row(row: dict) -> tuple[dict | None, str | None]:
    """(plan entry, None) or (None, reason) for the checks that need no image file."""
    for col in REQUIRED:
        if row.get(col) is not None and not isinstance(row[col], str):
            return None, "wrong_type"
    negs_text, negs_image = _as_list(row.get("neg_text")), _as_list(row.get("neg_image_path"))
    if negs_text is None or negs_image is None:
        return None, "wrong_type"
    sides = {}
    for side, tcol, icol in (("query", "qry", "qry_image_path"), ("positive", "pos_text", "pos_image_path")):
        text, image = (row.get(tcol) or "").strip(), (row.get(icol) or "").strip()
        if not text and not image:
            return None, "empty_text"
        sides[side] = {"text": row.get(tcol) or None, "image": image or None}
    negatives = []
    for i in range(max(len(negs_text), len(negs_image))):
        text = negs_text[i] if i < len(negs_text) else None
        image = (negs_image[i] if i < len(negs_image) else None) or None
        if (text or "").strip() or image:  # an empty negative slot is no negative (most MMEB rows)
            negatives.append({"text": text or None, "image": image})
    return {**sides, "negatives": negatives}, None


# -- writing shards (in pool workers) ---------------------------------------------------------
def _load_image(images: Path, rel: str):
    """ImageBytes of one file, or a skip reason."""
    path = images / rel
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "missing_image"
    except OSError:
        return "unreadable_image"
    return image_from_bytes(data, rel)


def image_from_bytes(data: bytes, name: str):
    """ImageBytes of encoded image bytes (stored as they came; the extension from the decoder's format, else
    from ``name``), or ``"unreadable_image"`` when PIL cannot parse them."""
    from PIL import Image

    from embedkit.data.shards import ImageBytes

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # header and structure, no full decode
            fmt = (im.format or "").lower()
    except Exception:
        return "unreadable_image"
    ext = {"jpeg": "jpg", "": Path(name).suffix.lstrip(".").lower() or "img"}.get(fmt, fmt)
    return ImageBytes(data, ext)


def load_slot(job: dict, slot: dict):
    """One planned slot (``{"text", "image": path relative to job["images"] | None}``) -> an ``Item``, or
    (skip reason, the file's path) when its image is missing or unreadable."""
    from embedkit.data.schema import Item

    image = None
    if slot.get("image"):
        image = _load_image(Path(job["images"]), slot["image"])
        if isinstance(image, str):
            return image, str(Path(job["images"]) / slot["image"])
    return Item(text=slot["text"], image=image)


def _load_entry(job: dict, entry: dict, load) -> tuple[list | None, tuple | None]:
    """(items: query, positive, negatives..., None) or (None, (reason, path)) at the first slot that fails."""
    items = []
    for slot in (entry["query"], entry["positive"], *entry["negatives"]):
        item = load(job, slot)
        if isinstance(item, tuple):
            return None, item
        items.append(item)
    return items, None


def write_one(job: dict, load=None) -> dict:
    """Write one planned shard: load its rows' slots (``load(job, slot)``: an ``Item`` or (reason, path);
    default ``load_slot``), skip bad rows, write tar + sidecar. Returns the sidecar (counts, skips by
    reason and, when any, the missing files' paths)."""
    from embedkit.data.schema import Example
    from embedkit.data.shards import encode_example, write_shard

    load = load or load_slot
    samples, skipped, missing = [], Counter(), []
    for index, entry in job["rows"]:
        items, failed = _load_entry(job, entry, load)
        if failed is not None:
            skipped[failed[0]] += 1
            if failed[0].startswith("missing"):
                missing.append(failed[1])
            continue
        ex = Example(query=items[0], positive=items[1], negatives=items[2:], task=job["subset"])
        files = encode_example(ex, f"{job['key']}-{index:09d}")
        meta = json.loads(files[next(k for k in files if k.endswith(".json"))])
        meta["meta_task"] = job["meta_task"]  # additive: decode_sample ignores it
        files[next(k for k in files if k.endswith(".json"))] = json.dumps(meta).encode()
        samples.append(files)
    shard = Path(job["path"])
    side = {"count": len(samples), "rows": len(job["rows"]), "skipped": dict(skipped), "plan": job["plan"]}
    if missing:
        side["missing"] = missing
    if samples:
        write_shard(shard, samples)
        side["bytes"] = shard.stat().st_size
        side["sha256"] = sha256_file(shard)
    write_atomic(_sidecar(shard), json.dumps(side, sort_keys=True))
    return side


def _sidecar(shard: Path) -> Path:
    return shard.with_name(f".{shard.name}.json")


def _done(shard: Path, plan: str) -> dict | None:
    """The sidecar of a shard completed from the same plan (tar present, or no sample at all), else None."""
    sidecar = _sidecar(shard)
    if not sidecar.is_file():
        return None
    side = json.loads(sidecar.read_text())
    if side.get("plan") != plan or (side["count"] and not shard.is_file()):
        return None
    return side


def _plan_digest(job: dict) -> str:
    """What a shard is made of (its rows, subset, meta-task, image root): a changed source, cap or
    shard size changes it, and the shard is rewritten instead of kept."""
    what = [FORMAT_VERSION, job["subset"], job["meta_task"], job["key"], job["images"], job["rows"]]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Shards of an earlier run beyond this plan (a lower cap, a larger shard size) would be trained on."""
    if folder.is_dir():
        for path in folder.glob("train-*.tar*"):
            if path.name not in keep:
                path.unlink()
        for path in folder.glob(".train-*.tar.json"):
            if path.name[1:-5] not in keep:
                path.unlink()


# -- the command ------------------------------------------------------------------------------
def load_train_yaml(path: Path | None) -> dict[str, dict]:
    """subset -> {meta_task, cap} from data/mmeb/train.yaml (empty when it is not there)."""
    if path is None or not Path(path).is_file():
        return {}
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    return {name: dict(spec or {}) for name, spec in (doc.get("subsets") or {}).items()}


class Progress:
    """A bar on a TTY, plain lines otherwise (CI logs)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.tty = interactive()
        self.stream = sys.stderr if self.tty else sys.stdout  # the bar on the terminal, lines with the log
        self.started = time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        if self.tty:
            width = 30
            fill = int(width * self.done / max(1, self.total))
            self.stream.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} shards  {what[:50]:<50}")
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(f"shard {self.done}/{self.total}: {what}\n")
        self.stream.flush()


def write_jobs(todo: list[dict], workers: int | None, write=write_one) -> None:
    """Write the planned shards with ``write(job)`` (a picklable module-level callable: the pool pickles
    it), in a process pool (bounded by the cores) with a progress line each."""
    progress = Progress(len(todo))
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    if workers == 1:
        for j in todo:
            write(j)
            progress.step(f"{j['subset']}/{Path(j['path']).name}")
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for j, _ in zip(todo, pool.map(write, todo)):
            progress.step(f"{j['subset']}/{Path(j['path']).name}")


def _plan_subset(subset: str, files: list[Path], cap: int, meta_task: str | None, out: Path, images: Path,
                 shard_size: int, jobs: list[dict]) -> dict:
    """Check the rows of one subset (no images read), keep the first ``cap`` that pass, plan their
    shards (appended to ``jobs``) and remove shards of an earlier, longer plan."""
    skipped, kept, seen = Counter(), [], 0
    for path in files:
        for row in read_rows(path):
            if cap and len(kept) >= cap:
                break
            entry, reason = check_row(row)
            if reason:
                skipped[reason] += 1
            else:
                kept.append((seen, entry))
            seen += 1
        if cap and len(kept) >= cap:
            break
    shards = plan_shards(subset, kept, meta_task, out, images, shard_size, jobs)
    return {"meta_task": meta_task, "cap": cap, "source": [str(p) for p in files], "skipped": skipped,
            "shards": shards, "rows": seen}


def plan_shards(subset: str, kept: list, meta_task: str | None, out: Path, images: Path, shard_size: int,
                jobs: list[dict]) -> list[Path]:
    """Plan the shards of one source over its ``kept`` rows ([(index, entry)]; appended to ``jobs``, each
    with its plan digest), remove shards of an earlier, longer plan; returns the shard paths."""
    key = subset.replace(".", "_")
    shards = []
    for n, start in enumerate(range(0, len(kept), shard_size)):
        path = out / subset / f"train-{n:06d}.tar"
        shards.append(path)
        jobs.append({"subset": subset, "meta_task": meta_task, "key": key, "images": str(images),
                     "path": str(path), "rows": kept[start : start + shard_size]})
        jobs[-1]["plan"] = _plan_digest(jobs[-1])
    _remove_stale(out / subset, {p.name for p in shards})
    return shards


def convert(src: str | Path, out: str | Path, *, images: str | Path | None = None, subsets: list[str] | None = None,
            split: str = "original", cap: int | None = None, shard_size: int = 1000, workers: int | None = None,
            config: str | Path | None = TRAIN_YAML, log=print) -> int:
    """Convert the subsets under ``src`` into shards under ``out`` (see the module docstring)."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    images = Path(images).expanduser() if images else src
    sources = _checked_sources(src, images, split, subsets, shard_size)
    spec = load_train_yaml(Path(config) if config else None)

    # plan: cheap checks in the parent, shards planned over the rows that pass
    jobs, planned = [], {}
    for subset, files in sources.items():
        subset_cap = cap if cap is not None else int(spec.get(subset, {}).get("cap", 50000))
        planned[subset] = _plan_subset(subset, files, subset_cap, spec.get(subset, {}).get("meta_task"),
                                       out, images, shard_size, jobs)

    # write: resumable (completed shards are skipped), in parallel
    todo = [j for j in jobs if _done(Path(j["path"]), j["plan"]) is None]
    log(f"mmeb: {len(planned)} subsets, {len(jobs)} shards ({len(jobs) - len(todo)} already complete) -> {out}")
    write_jobs(todo, workers)

    # manifest, from the sidecars (this run's and earlier runs')
    manifest = {"format": FORMAT_VERSION, "split": split, "src": str(src), "images": str(images), "subsets": {}}
    plans = {j["path"]: j["plan"] for j in jobs}
    for subset, info in planned.items():
        manifest["subsets"][subset] = entry = _subset_entry(info, plans, out)
        why = ", ".join(f"{n} {r}" for r, n in entry["skipped"].items()) or "none"
        log(f"  {subset}: {entry['count']} examples in {len(entry['shards'])} shards; skipped: {why}")
    entries = manifest["subsets"].values()
    manifest["total"] = total = {"count": sum(s["count"] for s in entries), "bytes": sum(s["bytes"] for s in entries),
                                 "skipped": dict(sum((Counter(s["skipped"]) for s in entries), Counter()))}
    written = write_manifest(out, manifest)
    log(f"mmeb: {total['count']} examples, {total['bytes'] / 1e6:.1f} MB; manifest {written}")
    empty = [subset for subset, s in manifest["subsets"].items() if s["count"] == 0]
    if empty:
        raise UserError(f"no valid row in subset(s) {', '.join(empty)}: see skipped counts in {written}")
    return 0


def _checked_sources(src: Path, images: Path, split: str, subsets: list[str] | None, shard_size: int) -> dict:
    """{subset: its files} to convert; one-line ``UserError``s (named by option) for what cannot be."""
    if not src.is_dir():
        raise UserError(f"src: {src} is not a folder")
    if not images.is_dir():
        raise UserError(f"images: {images} is not a folder")
    if shard_size < 1:
        raise UserError("shard_size: must be at least 1")
    sources = find_sources(src, split)
    if subsets:
        missing = [s for s in subsets if s not in sources]
        if missing:
            raise UserError(f"subsets: {', '.join(missing)} not found in {src} (found: {', '.join(sources) or 'none'})")
        sources = {s: sources[s] for s in subsets}
    if not sources:
        raise UserError(f"src: no {split}-*.parquet subset folders and no .parquet/.jsonl files in {src}")
    return sources


def _subset_entry(info: dict, plans: dict, out: Path) -> dict:
    """A subset's manifest entry from its shards' sidecars: counts, bytes, digest, skipped rows by reason."""
    skipped, shards = info["skipped"], []
    for path in info["shards"]:
        side = _done(path, plans[str(path)])
        skipped.update(side["skipped"])
        if side["count"]:
            shards.append({"path": str(path.relative_to(out)), "count": side["count"],
                           "bytes": side["bytes"], "sha256": side["sha256"]})
    return {
        "meta_task": info["meta_task"], "cap": info["cap"], "count": sum(s["count"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "digest": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
        "skipped": {r: n for r, n in sorted(skipped.items()) if n}, "shards": shards, "source": info["source"],
    }
