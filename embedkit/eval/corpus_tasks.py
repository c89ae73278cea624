"""Retrieval over a corpus, read from task folders: visual documents, text<->video, classification, moments.

MMEB V1's protocol ranks each query against its own short candidate list (``eval/mmeb.py``). The
tasks the video and document items are measured on rank a query against a whole corpus instead, with
graded relevance (docs/eval-tasks.md has the folder format and each kind's metrics):

- ``retrieval``: every query against the whole corpus, graded qrels; NDCG@5 (log2 discount, linear
  gains), hit@k, recall@k and MRR from ``eval/ranking.py`` (its tie rule: equal scores rank by corpus
  order). Main metric ``ndcg_linear@5``: visual-document retrieval (ViDoRe, MMEB-V2 VisDoc).
- ``video_text``: each query text has exactly one relevant video of the corpus; text->video and
  video->text R@1/5/10, MdR, MnR over the whole video set (``ranking.set_retrieval``, as LLaVE reports
  MSR-VTT and MSVD). Main metric ``t2v/R@1``.
- ``classification``: the corpus is the label set (one text per label), each query one relevant label;
  main metric ``hit@1`` (accuracy).
- ``moment``: each query names its own candidate clips (``candidates``); it is ranked against those only
  (the rest of the corpus scores -inf), main metric ``hit@1``.

Items come from the rows through ``rows.RowItems`` (text, images, video, paths relative to the
task folder), each side with its task's instruction. ``encode`` is any callable (``EncodeFn``), so the
protocol is tested with fake encoders; under ``torch.distributed`` the ranks share the encoding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from embedkit.errors import UserError
from embedkit.eval import ranking
from embedkit.files import read_jsonl

#: kind -> its main metric
KINDS = {"retrieval": "ndcg_linear@5", "video_text": "t2v/R@1", "classification": "hit@1", "moment": "hit@1"}
FILES = ("task.json", "queries.jsonl", "corpus.jsonl", "qrels.jsonl")


@dataclass
class CorpusTask:
    """One task folder read and checked: rows of both sides, ``qrels[q] = {corpus index: grade}``,
    ``candidates[q]`` (moment tasks: the corpus indices query q is ranked against), the instructions."""

    name: str
    folder: Path
    kind: str
    queries: list[dict]
    corpus: list[dict]
    qrels: list[dict[int, float]]
    candidates: list[list[int]] | None = None
    instructions: dict = field(default_factory=dict)

    @property
    def main(self) -> str:
        return KINDS[self.kind]


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"eval task: no {path.name} in {path.parent}")
    return read_jsonl(path, "eval task")


def _ids(rows: list[dict], path: Path) -> dict[str, int]:
    index: dict[str, int] = {}
    for n, row in enumerate(rows):
        rid = row.get("id")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise UserError(f"eval task: {path} row {n + 1} has no id (a string)")
        if str(rid) in index:
            raise UserError(f"eval task: {path} has the id {rid!r} twice")
        index[str(rid)] = n
    return index


def _read_qrels(path: Path, queries: dict[str, int], corpus: dict[str, int]) -> list[dict[int, float]]:
    qrels: list[dict[int, float]] = [{} for _ in queries]
    for n, row in enumerate(_jsonl(path), 1):
        q, d, grade = str(row.get("query")), str(row.get("doc")), row.get("grade", 1)
        if q not in queries or d not in corpus:
            missing = f"query {q!r}" if q not in queries else f"doc {d!r}"
            raise UserError(f"eval task: {path}:{n} names {missing}, which is not in the task")
        if isinstance(grade, bool) or not isinstance(grade, (int, float)) or not grade >= 0:
            raise UserError(f"eval task: {path}:{n} grade {grade!r} is not a number >= 0")
        qrels[queries[q]][corpus[d]] = float(grade)
    return qrels


def _candidates(queries: list[dict], corpus: dict[str, int], qrels, folder: Path) -> list[list[int]]:
    out = []
    for n, row in enumerate(queries):
        names = row.get("candidates")
        if not isinstance(names, list) or not names:
            raise UserError(f"eval task {folder.name}: a moment task's query {row.get('id')!r} needs a candidates list")
        unknown = [c for c in names if str(c) not in corpus]
        if unknown:
            raise UserError(f"eval task {folder.name}: query {row.get('id')!r} names candidate {unknown[0]!r}, "
                            "which is not in corpus.jsonl")
        picked = [corpus[str(c)] for c in names]
        outside = [c for c, g in qrels[n].items() if g > 0 and c not in picked]
        if outside:
            raise UserError(f"eval task {folder.name}: query {row.get('id')!r} has a relevant doc outside its "
                            "candidates")
        out.append(picked)
    return out


def _check_relevance(task: CorpusTask) -> None:
    for n, rel in enumerate(task.qrels):
        relevant = [c for c, g in rel.items() if g > 0]
        if not relevant:
            raise UserError(f"eval task {task.name}: query {task.queries[n].get('id')!r} has no relevant doc "
                            "in qrels.jsonl")
        if task.kind in ("video_text", "classification") and len(relevant) != 1:
            raise UserError(f"eval task {task.name}: a {task.kind} query has exactly one relevant doc; "
                            f"{task.queries[n].get('id')!r} has {len(relevant)}")


def read_task(folder: str | Path) -> CorpusTask:
    """A task folder read and checked; one-line ``UserError`` for every way it can be malformed."""
    folder = Path(folder)
    if not (folder / "task.json").is_file():
        raise UserError(f"eval task: {folder} has no task.json (a task folder holds {', '.join(FILES)})")
    try:
        spec = json.loads((folder / "task.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"eval task: {folder / 'task.json'} is not JSON ({exc.msg})") from None
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in KINDS:
        raise UserError(f"eval task: {folder / 'task.json'} kind must be one of {', '.join(KINDS)}, got {kind!r}")
    queries, corpus = _jsonl(folder / "queries.jsonl"), _jsonl(folder / "corpus.jsonl")
    q_ids, c_ids = _ids(queries, folder / "queries.jsonl"), _ids(corpus, folder / "corpus.jsonl")
    qrels = _read_qrels(folder / "qrels.jsonl", q_ids, c_ids)
    instructions = {side: spec.get(f"{side}_instruction") for side in ("query", "candidate")}
    task = CorpusTask(folder.name, folder, kind, queries, corpus, qrels, instructions=instructions)
    _check_relevance(task)
    if kind == "moment":
        task.candidates = _candidates(queries, c_ids, qrels, folder)
    return task


def task_scores(task: CorpusTask, q: torch.Tensor, c: torch.Tensor, normalize: bool = True) -> dict:
    """The task's metrics from the embeddings of its queries ``q`` and corpus ``c`` (dense [n, D] or token
    sets [n, T, d]): ``{"main": name, "score": value, "metrics": {...}}``."""
    from embedkit.losses.similarity import similarity_for

    if normalize and q.dim() == 2:
        q, c = torch.nn.functional.normalize(q.float(), dim=-1), torch.nn.functional.normalize(c.float(), dim=-1)
    scores = similarity_for(q)(q.float(), c.float()).double()
    if task.candidates is not None:
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for n, picked in enumerate(task.candidates):
            allowed[n, picked] = True
        scores = scores.masked_fill(~allowed, float("-inf"))
    if task.kind == "video_text":
        videos = [next(c for c, g in rel.items() if g > 0) for rel in task.qrels]
        both = ranking.set_retrieval(scores, videos)
        metrics = {f"{way}/{k}": v for way, m in both.items() for k, v in m.items()}
    else:
        metrics = ranking.ranking_report(scores, task.qrels)
    return {"main": task.main, "score": metrics[task.main], "metrics": metrics}


def evaluate_task(task: CorpusTask, encode: Callable, *, normalize: bool = True, item_options: dict | None = None,
                  log: Callable[[str], None] | None = None, encode_candidates: Callable | None = None) -> dict:
    """Encode a task's queries and corpus (the ranks sharing the work) and score it; the result also
    records the sizes and ``item_options`` (the frame policy and caps the items were made with).
    ``encode_candidates``: the corpus's encoder where a model frames documents apart (GME's system message;
    None: ``encode``)."""
    from embedkit.inference import encode_shared
    from embedkit.rows import RowItems

    options = item_options or {}
    sides = {}
    for side, rows in (("query", task.queries), ("candidate", task.corpus)):
        items = RowItems(rows, task.folder, task.instructions.get(side), **options)
        if log:
            log(f"  {task.name}: encoding {len(rows)} {'queries' if side == 'query' else 'corpus items'}")
        sides[side] = encode_shared(items, encode if side == "query" else (encode_candidates or encode))
    result = task_scores(task, sides["query"], sides["candidate"], normalize)
    result.update(kind=task.kind, queries=len(task.queries), corpus=len(task.corpus))
    return result


def metric_items(results: dict[str, dict]) -> dict[str, float]:
    """Display names of every task metric: ``eval/<task>/<metric>`` (``ndcg_linear@5``, ``t2v/R@1``, ...)."""
    return {f"eval/{name}/{k}": v for name, r in results.items() for k, v in r["metrics"].items()}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per task: kind, sizes, the main metric and the frame/pixel settings its items were made with."""
    lines = ["| task | kind | queries | corpus | metric | score | items |", "|---|---|---:|---:|---|---:|---|"]
    for name, r in results.items():
        items = ", ".join(f"{k}={v}" for k, v in r.get("items", {}).items() if k != "frames") or "-"
        frames = r.get("items", {}).get("frames")
        if frames:
            items += f", {frames['num_frames']} frames {frames['sampling']}"
        lines.append(f"| {name} | {r['kind']} | {r['queries']} | {r['corpus']} | {r['main']} | "
                     f"{100 * r['score']:.2f} | {items} |")
    return "\n".join(lines) + "\n"
