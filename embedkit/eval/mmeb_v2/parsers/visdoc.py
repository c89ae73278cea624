"""ViDoRe (V1, V2, the OOD tasks) and VisRAG: BEIR-style ``queries``, ``corpus``, ``qrels`` configs
(mmeb-v2.md section 3), global over the task's whole corpus, graded relevance.

Layout: ``<task>/queries/``, ``<task>/corpus/``, ``<task>/qrels/`` each holding that config's files as the
HF dataset ships them (``*.parquet`` or ``*.jsonl``; the pin's split: ``test`` for ViDoRe, ``train`` for
VisRAG). Columns: queries ``query-id``, ``query``; corpus ``corpus-id``, ``image`` (an HF image struct with
``bytes``, or a path relative to ``<task>/``); qrels ``query-id``, ``corpus-id``, ``score``. As VLM2Vec's
``load_qrels`` (``src/utils/dataset_utils.py``): only ``score > 0`` is kept, a repeated pair keeps its
maximum, the grades are the NDCG gains. A query no qrel names is not evaluated (its count is what the
pin's ``num_queries`` counts); the pin's ``extra.language``, when set, keeps that language's queries
(VLM2Vec's English ViDoRe-V2 variants, ``vidore_dataset.py#L82-86``). Ids are strings (ViDoRe's are ints, VisRAG's file names).
"""

from __future__ import annotations

from pathlib import Path

from embedkit.eval.corpus_tasks import CorpusTask
from embedkit.eval.mmeb_v2.parsers.common import Builder, MissingData, column, join, read_rows, task_dir


def _configs(folder: Path, split: str | None) -> dict[str, list[dict]]:
    out, missing = {}, []
    for config in ("queries", "corpus", "qrels"):
        try:
            out[config] = read_rows(folder / config, split, config)
        except MissingData as exc:
            missing += exc.reasons
    if missing:
        raise MissingData(missing)
    return out


def _qrels(rows: list[dict], name: str) -> dict[str, dict[str, float]]:
    """``{query-id: {corpus-id: grade}}``: positive grades only, a repeated pair at its maximum."""
    out: dict[str, dict[str, float]] = {}
    for n, row in enumerate(rows):
        grade = float(column(row, "score", n, name))
        if grade > 0:
            docs = out.setdefault(str(column(row, "query-id", n, name)), {})
            cid = str(column(row, "corpus-id", n, name))
            docs[cid] = max(grade, docs.get(cid, 0.0))
    return out


def _spill(folder: Path, cid: str, data: bytes) -> list:
    """A page shipped as bytes, written once to ``<task>/images/`` (as VLM2Vec caches pages to its
    ``image_root``) so that no corpus is held in memory: its path; the bytes themselves where the data root
    is read-only."""
    import hashlib
    import os
    import re

    ext = ".png" if data[:4] == b"\x89PNG" else ".jpg" if data[:2] == b"\xff\xd8" else ".img"
    # named by its content too: an edited page is a new file, so the cache key (the item's path) changes
    name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', cid)[:50]}_{hashlib.sha1(data).hexdigest()[:12]}{ext}"
    path = folder / "images" / name
    if path.is_file():
        return [str(path)]
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")  # one temporary per process: ranks parse at once
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return [str(path)] if path.is_file() else [{"bytes": data}]
    return [str(path)]


def _page(b: Builder, value, cid: str) -> list | None:
    if isinstance(value, dict) and value.get("bytes"):
        return _spill(b.folder, cid, value["bytes"])
    path = value.get("path") if isinstance(value, dict) else value
    if not path:
        b.missing.append("a corpus row has no image")
        return None
    found = b.image(Path(path) if Path(path).is_absolute() else b.folder / path)
    return [found] if found else None


def visdoc(pin, root: Path) -> CorpusTask:
    b = Builder(pin, task_dir(root, pin))
    tables = _configs(b.folder, pin.dataset.get("split"))
    for n, row in enumerate(tables["corpus"]):
        raw = column(row, "corpus-id", n, pin.name)
        cid = str(raw)
        index = b.doc(join(pin.candidate_instruction, None), images=_page(b, column(row, "image", n, pin.name), cid),
                      doc_id=cid)
        b.corpus[index]["source_id"] = raw  # as the dataset types it: VLM2Vec's NDCG pairing keys on it
    qrels = _qrels(tables["qrels"], pin.name)
    language = (pin.extra or {}).get("language")
    for n, row in enumerate(tables["queries"]):
        qid = str(column(row, "query-id", n, pin.name))
        if qid not in qrels or (language and row.get("language") != language):
            continue
        unknown = [c for c in qrels[qid] if c not in b.index]
        if unknown:
            b.missing.append(f"query {qid}: relevant page {unknown[0]!r} is not in the corpus")
            continue
        b.query(join(pin.query_instruction, str(column(row, "query", n, pin.name))),
                {b.index[c]: g for c, g in qrels[qid].items()}, query_id=qid)
    return b.build()
