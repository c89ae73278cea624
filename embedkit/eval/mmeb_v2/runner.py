"""``embedkit eval benchmark=mmeb_v2[@version]``: every task of a pinned protocol, offline, resumable.

1. ``prepare``: every task's layout is parsed (``parsers``) and its query count checked against the pin
   before anything is encoded; what is missing or miscounted is ONE ``UserError`` naming each task
   (exit 2), unless ``allow_missing``: then those tasks are left out and every output says ``partial``.
2. ``evaluate``: per task, the distinct queries and the corpus are encoded once, split across the ranks
   (``inference.encode_shared``; a model's ``encode_items`` orders and batches each share by token cost,
   as training's chunking does), or read from the cache (``cache.EmbeddingCache``: keyed by the model's and
   the task's fingerprints, written atomically, so a killed run resumes). Scores: ``local`` tasks rank each
   query against its own candidates, ``global`` ones against the whole corpus (``eval/ranking.py``: one
   tie rule, graded NDCG); visdoc tasks also get ``ndcg_linear@5_vlm2vec`` (VLM2Vec's label/grade pairing,
   ``ranking.ndcg_vlm2vec_convention``) beside the correct one.
3. ``write``: ``<out>/mmeb_v2/results.json`` (the protocol's and the model's fingerprints, ``partial``,
   ``missing``, a record per task) and the leaderboard summary (``summary.py``), each written atomically;
   the results hold no time or path that differs between runs, so a resumed run's files equal an
   uninterrupted one's byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from embedkit.data.schema import Item
from embedkit.errors import UserError
from embedkit.eval import ranking
from embedkit.eval.corpus_tasks import CorpusTask
from embedkit.eval.mmeb_v2.cache import EmbeddingCache, data_fingerprint
from embedkit.eval.mmeb_v2.parsers import MissingData, parse
from embedkit.eval.mmeb_v2.parsers.common import item_key
from embedkit.fault_points import fault_point
from embedkit.files import write_atomic
from embedkit.inference import LazyItems, encode_shared


@dataclass
class Prepared:
    """The tasks that can run (pin, task, cache key) and, with ``allow_missing``, what could not."""

    tasks: list[tuple] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)
    #: task -> {annotation file: sha256} (``data_files``)
    files: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return bool(self.missing)


def prepare(protocol, root: str | Path | None, allow_missing: bool = False) -> Prepared:
    """Parse every task of ``protocol`` under ``root`` (docs/mmeb-v2.md "Running it") and check its counts."""
    if not root:
        raise UserError("benchmark: no data root; give data.eval.mmeb_v2_root=DIR (the MMEB-V2 eval layout, "
                        "docs/mmeb-v2.md)")
    if not Path(root).is_dir():
        raise UserError(f"data.eval.mmeb_v2_root: folder not found: {root}")
    out = Prepared()
    for pin in protocol.tasks:
        try:
            task = parse(pin, root)
        except MissingData as exc:
            out.missing[pin.name] = exc.reasons
            continue
        except (TypeError, KeyError, AttributeError) as exc:  # a value of the wrong kind: not this layout
            out.missing[pin.name] = [f"rows not in the {pin.parser} layout ({type(exc).__name__}: {exc})"]
            continue
        found = data_files(pin, root)
        wrong = check_task(pin, task, found)
        if wrong:
            out.missing[pin.name] = wrong
            continue
        keys = [item_key(r) for r in task.queries + task.corpus]
        out.files[pin.name] = found
        out.tasks.append((pin, task, data_fingerprint([pin.fingerprint(), found, *keys])))
    if out.missing and not allow_missing:
        raise UserError(missing_report(protocol, out.missing))
    return out


def data_files(pin, root: str | Path) -> dict[str, str]:
    """sha256 of every annotation file of a task's folder (relative path -> hex digest): recorded in each
    task's result (``data_files``), so two runs on different downloads differ visibly; copy them into a
    protocol file's ``dataset.files`` to pin a download."""
    from embedkit.eval.mmeb_v2.parsers.common import annotation_files, task_dir
    from embedkit.files import sha256_file

    folder = task_dir(Path(root), pin)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in annotation_files(folder)}


def check_task(pin, task: CorpusTask, found: dict[str, str]) -> list[str]:
    """What stops a parsed task: a query count other than the pin's, a pinned file absent or with other
    bytes (``dataset.files``: another revision of the dataset)."""
    problems = []
    if len(task.queries) != pin.num_queries:
        problems.append(f"{len(task.queries)} queries, the pin says {pin.num_queries}")
    for rel, digest in sorted(((pin.dataset or {}).get("files") or {}).items()):
        if rel not in found:
            problems.append(f"pinned file {rel} not found")
        elif found[rel] != digest:
            problems.append(f"{rel} has sha256 {found[rel][:12]}, the pin says {digest[:12]} (another revision?)")
    return problems


def missing_report(protocol, missing: dict[str, list[str]]) -> str:
    """One line: how many tasks cannot run, each named with its reasons, and how to go on without them."""
    listed = " | ".join(f"{name}: {'; '.join(reasons)}" for name, reasons in missing.items())
    return (f"benchmark {protocol.benchmark}@{protocol.version}: {len(missing)} of {len(protocol.tasks)} tasks "
            f"missing or miscounted -- {listed} (allow_missing=true scores the rest, marked partial)")


# ---------------------------------------------------------------- items


class TaskItems(LazyItems):
    """A task's rows as ``Item``s made on demand: images decoded (or, for ``sized``, opened for their size
    only) and capped at ``max_pixels`` (the pin's cap, ``encoder.capped``); a frame list becomes the
    item's video (``Frames``, already selected by the parser). Picklable."""

    def __init__(self, rows: list[dict], max_pixels: int | None):
        self.rows, self.max_pixels = rows, max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Item:
        from embedkit.encoder import capped

        return capped(self._item(i, decode=True), self.max_pixels)

    def sized(self, i: int) -> Item:
        return self._item(i, decode=False)

    def _item(self, i: int, decode: bool) -> Item:
        from embedkit.data.schema import Frames
        from embedkit.rows import open_image

        row = self.rows[i]

        def image(value):
            im = open_image(value, Path("/"))
            return im.convert("RGB") if decode else im

        if row.get("frames"):
            frames = [image(p) for p in row["frames"]]
            if decode:
                frames = [_fit(f, self.max_pixels) for f in frames]
            return Item(row.get("text"), video=Frames(frames, None, list(range(len(frames))), len(frames)))
        return Item(row.get("text"), images=[image(v) for v in row.get("images", [])])


def _fit(image, max_pixels: int | None):
    from embedkit.data.pixels import fit

    return fit(image, max_pixels)


# ---------------------------------------------------------------- scoring


def scores_of(task: CorpusTask, q: torch.Tensor, c: torch.Tensor, normalize: bool):
    """(scores [Q, K], qrels over those K columns, the columns' corpus ids): the whole corpus for a global
    task; for a local one each query's own candidates in its list's order (shorter lists padded with
    -inf, never relevant)."""
    from embedkit.losses.similarity import similarity_for

    if normalize and q.dim() == 2:
        q, c = torch.nn.functional.normalize(q.float(), dim=-1), torch.nn.functional.normalize(c.float(), dim=-1)
    sim = similarity_for(q)
    if task.candidates is None:
        return sim(q.float(), c.float()).double(), task.qrels, vlm2vec_ids(task.corpus)
    width = max(len(cands) for cands in task.candidates)
    scores = torch.full((len(task.queries), width), float("-inf"), dtype=torch.float64)
    qrels = []
    for n, cands in enumerate(task.candidates):
        scores[n, : len(cands)] = sim(q[n : n + 1].float(), c[cands].float()).double()[0]
        qrels.append({pos: task.qrels[n][ci] for pos, ci in enumerate(cands) if ci in task.qrels[n]})
    return scores, qrels, None


def vlm2vec_ids(corpus: list[dict]) -> list | None:
    """The ids VLM2Vec's NDCG pairing keys on (``ranking.ndcg_vlm2vec_convention``): the dataset's own
    integer corpus-ids (ViDoRe, the OOD sets: a set of ints has one order, so the number is VLM2Vec's);
    for string ids (VisRAG's file names) their set order follows PYTHONHASHSEED in VLM2Vec's runs too, so
    the corpus positions stand in (None), which keeps the result the same in every process. Grades are
    uniform on those tasks, where the pairing cannot change the score."""
    ids = [r.get("source_id") for r in corpus]
    return ids if all(isinstance(i, int) and not isinstance(i, bool) for i in ids) else None


def task_record(pin, task: CorpusTask, q: torch.Tensor, c: torch.Tensor, normalize: bool) -> dict:
    """A task's result record (docs/mmeb-v2.md): the pinned metric as ``score``, every ranking metric, and
    for an NDCG task the number VLM2Vec's code gives beside the correct one."""
    scores, qrels, ids = scores_of(task, q, c, normalize)
    metrics = ranking.ranking_report(scores, qrels)
    record = {"task": pin.name, "metric": pin.metric, "score": metrics[pin.metric], "metrics": metrics,
              "num_queries": len(task.queries), "num_candidates": len(task.corpus), "scope": pin.scope,
              "task_fingerprint": pin.fingerprint()}
    if pin.metric.startswith("ndcg_linear"):
        k = int(pin.metric.rpartition("@")[2])
        record[f"{pin.metric}_vlm2vec"] = ranking.ndcg_vlm2vec_convention(scores, qrels, k=k, ids=ids)
    return record


# ---------------------------------------------------------------- the run


def model_encoder(model, chunk_size: int, dtype: str | None = None, num_workers: int = 0,
                  side: str | None = None) -> Callable:
    """``encode(items)`` of an opened model, cast to ``dtype`` and on this rank's GPU when there is one:
    its ``encode_items`` (the inference engine: each share ordered and batched by token cost); ``side``
    ``"candidate"`` frames items as the model frames documents (GME's default system message)."""
    import os

    if dtype:
        from embedkit.backbones.base import torch_dtype

        model.to(torch_dtype(dtype))
    if torch.cuda.is_available():
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    engine = {"num_workers": num_workers} if num_workers else {}
    if side is not None:
        engine["side"] = side
    return lambda items: model.encode_items(items, chunk_size, **engine)


def distinct(rows: list[dict]) -> tuple[list[dict], list[int]]:
    """The rows with equal items once (first-seen order) and each row's position among them."""
    pos: dict[str, int] = {}
    index = [pos.setdefault(item_key(r), len(pos)) for r in rows]
    firsts: dict[int, dict] = {}
    for r, i in zip(rows, index):
        firsts.setdefault(i, r)
    return [firsts[i] for i in range(len(pos))], index


def embed(pin, task: CorpusTask, encode: Callable, key: str, cache: EmbeddingCache,
          encode_candidates: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(query embeddings, corpus embeddings, whether they came from the cache) of one task; the corpus
    through ``encode_candidates`` where given (the model's candidate side)."""
    entry = cache.load(pin.name, key)
    if entry is not None:
        return entry["query"], entry["corpus"], True
    cap = (pin.pixels or {}).get("max_pixels")
    unique, index = distinct(task.queries)
    q = encode_shared(TaskItems(unique, cap), encode)[torch.tensor(index)]
    c = encode_shared(TaskItems(task.corpus, cap), encode_candidates or encode)
    cache.save(pin.name, key, q, c)
    return q, c, False


def evaluate(prepared: Prepared, encode: Callable, cache: EmbeddingCache, *, normalize: bool = True,
             log: Callable[[str], None] | None = None, encode_candidates: Callable | None = None) -> dict[str, dict]:
    """Every prepared task encoded (or read from the cache) and scored: ``{name: record}``. Every rank
    calls this (the encodings are shared); the fault point ``eval_dataset`` follows each task's cache write."""
    records = {}
    for i, (pin, task, key) in enumerate(prepared.tasks):
        if log:
            log(f"[mmeb_v2 {i + 1}/{len(prepared.tasks)}] {pin.name} ({pin.group}, {pin.scope}): "
                f"{len(task.queries)} queries, {len(task.corpus)} candidates")
        q, c, cached = embed(pin, task, encode, key, cache, encode_candidates)
        fault_point("eval_dataset")
        records[pin.name] = {**task_record(pin, task, q, c, normalize), "data_files": prepared.files.get(pin.name, {})}
        if log:
            log(f"  {pin.name}: {pin.metric} {records[pin.name]['score']:.4f}" + (" (embeddings from the cache)" if cached else ""))
    return records


def results(protocol, model: dict, records: dict[str, dict], prepared: Prepared) -> dict:
    """The run-level results object (docs/mmeb-v2.md); the protocol's header embeds its pins, so a report
    on these results needs no protocol file."""
    head = {**protocol.header(), "tasks": [pin.as_dict() for pin in protocol.tasks]}
    return {"protocol": head, "model": model, "partial": prepared.partial,
            "missing": list(prepared.missing), "missing_reasons": prepared.missing, "tasks": records}


def write(out_dir: str | Path, result: dict) -> Path:
    """``<out_dir>/mmeb_v2/results.json`` (sorted keys: the same results are the same bytes)."""
    path = Path(out_dir) / "mmeb_v2" / "results.json"
    write_atomic(path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path


def finish(out_dir: str | Path, protocol, model: dict, records: dict[str, dict], prepared: Prepared, *,
           report_file: str | None = None, log: Callable[[str], None] = print) -> tuple[dict, object]:
    """Rank 0's outputs under ``<out_dir>/mmeb_v2/``: ``results.json``, the leaderboard summary
    (``summary.json``/``summary.md``, partial when tasks are missing) and, with ``report_file`` (a published
    VLM2Vec score file), ``report.md``/``report.json``: the per-task diff naming the pins that differ.
    Returns (the results, the ``Summary``)."""
    from embedkit.eval.mmeb_v2 import summary as leaderboard

    result = results(protocol, model, records, prepared)
    folder = write(out_dir, result).parent
    summary = leaderboard.summarize(protocol, {name: r["score"] for name, r in records.items()})
    # summary.write's files, with the model's fingerprint added (the summary carries the protocol's)
    table = leaderboard.to_markdown(summary) + f"\nmodel {model['fingerprint'][:12]}\n"
    write_atomic(folder / "summary.json", json.dumps({**summary.to_dict(), "model": model}, indent=2, sort_keys=True) + "\n")
    write_atomic(folder / "summary.md", table)
    log(table.rstrip("\n"))
    if report_file:
        from embedkit.eval.mmeb_v2 import report

        text = report.report_text(result, report_file)
        report.write_report(folder / "report.md", text)
        report.write_report(folder / "report.json", report.report_text(result, report_file, fmt="json"))
        log(text.rstrip("\n"))
    log(f"mmeb_v2: files in {folder}")
    return result, summary
