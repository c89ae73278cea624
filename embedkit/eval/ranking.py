"""Graded and set retrieval metrics over a score matrix: NDCG@k, hit@k, recall@k, MRR, and
text<->video set retrieval. Pure functions, no model, no files; docs/metrics.md has the conventions.

Inputs: ``scores [Q, C]`` (torch or numpy; higher is better, -inf allowed for padding, NaN refused)
and ``qrels``: one mapping per query, ``{candidate index: grade}``, grades finite numbers >= 0. A
candidate is *relevant* when its grade is > 0 (MMEB-V2 keeps only qrels with score > 0, mmeb-v2.md
§3); grade-0 entries are accepted and count for nothing.

Tie rule (one for every metric here): equal scores are ranked by candidate index ascending, i.e. the
order of a stable sort on descending score. The rank of a candidate is therefore

    rank(q, c) = #{c' : s[q, c'] > s[q, c]} + #{c' < c : s[q, c'] == s[q, c]}     (0-based)

It is the rule ``retrieval.hits_at_1`` already uses (argmax picks the lowest index), so P@1 of the
per-query-candidates scope (candidate 0 = the answer) equals ``hit_at_k(scores, [{0: 1}] * R, 1)``.

Only the ranks of the judged candidates are needed: with few qrels per query they are counted
(O(#qrels * C) comparisons, no sort), with many the judged rows are sorted once (stable), both in
chunks. ``bench/ranking.py``: 1k queries x 10k candidates in 0.3 s (1 judged per query), 1.6 s (5) and
5.2 s (50) on 2 CPU cores shared with other work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from embedkit.errors import UserError

GAINS = ("linear", "exponential")
#: compared numbers per chunk of the rank count (bool [rows, C]); 16M -> 16 MiB per mask
_CHUNK = 1 << 24
#: judged candidates per judged query from which one sort per row beats counting (measured, 10k corpus)
_SORT_FROM = 4


@dataclass(frozen=True)
class Judged:
    """The judged (query, candidate) pairs of a run and their ranks under the tie rule.

    ``query``, ``candidate``, ``rank`` are long ``[N]``, ``grade`` float64 ``[N]``, one entry per
    qrel; ``num_queries`` = Q, ``num_candidates`` = C."""

    query: torch.Tensor
    candidate: torch.Tensor
    grade: torch.Tensor
    rank: torch.Tensor
    num_queries: int
    num_candidates: int


def judge(scores, qrels: Sequence[Mapping[int, float]], allow_empty: bool = False) -> Judged:
    """Ranks of every qrel's candidate in its query's row of ``scores [Q, C]``, tie rule above.

    ``allow_empty``: a query without any relevant candidate (no grade > 0) is an error unless true;
    when allowed, it scores 0 on every metric (and NDCG's IDCG = 0 -> 0, mmeb-v2.md §3)."""
    s = _score_matrix(scores)
    q, c, g = _flatten_qrels(qrels, s.shape[0], s.shape[1])
    if not allow_empty:
        _require_relevant(q, g, s.shape[0])
    return Judged(q, c, g, _ranks(s, q, c), s.shape[0], s.shape[1])


def _score_matrix(scores) -> torch.Tensor:
    """``scores`` as a CPU tensor without grad; integers become float64 (so -inf can pad them)."""
    s = torch.as_tensor(scores).detach().cpu()
    if not s.is_floating_point():
        s = s.double()
    if s.dim() != 2:
        raise UserError(f"scores must be a [queries, candidates] matrix, got shape {tuple(s.shape)}")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise UserError(f"scores must have at least one query and one candidate, got shape {tuple(s.shape)}")
    if bool(torch.isnan(s).any()):
        raise UserError("scores contain NaN; rank only finite scores (or -inf for padding)")
    return s


def _flatten_qrels(qrels, num_queries: int, num_candidates: int):
    if len(qrels) != num_queries:
        raise UserError(f"qrels has {len(qrels)} queries but scores has {num_queries} rows")
    rows = [(qi, ci, g) for qi, rel in enumerate(qrels) for ci, g in _items(rel, qi)]
    for qi, ci, g in rows:
        _check_qrel(qi, ci, g, num_candidates)
    q = torch.tensor([r[0] for r in rows], dtype=torch.long)
    c = torch.tensor([int(r[1]) for r in rows], dtype=torch.long)
    g = torch.tensor([float(r[2]) for r in rows], dtype=torch.float64)
    return q, c, g


def _items(rel, qi: int):
    if not isinstance(rel, Mapping):
        raise UserError(f"qrels of query {qi} must be a mapping {{candidate index: grade}}, got {type(rel).__name__}")
    return rel.items()


def _check_qrel(qi: int, ci, g, num_candidates: int) -> None:
    if isinstance(ci, bool) or not isinstance(ci, Integral) or not 0 <= ci < num_candidates:
        raise UserError(f"qrels of query {qi}: candidate {ci!r} is not an index in [0, {num_candidates})")
    if isinstance(g, bool) or not isinstance(g, Real) or not math.isfinite(g) or g < 0:
        raise UserError(f"qrels of query {qi}: grade {g!r} of candidate {ci} must be a finite number >= 0")


def _require_relevant(q: torch.Tensor, g: torch.Tensor, num_queries: int) -> None:
    has = torch.zeros(num_queries, dtype=torch.bool)
    has[q[g > 0]] = True
    if not bool(has.all()):
        first = int((~has).nonzero()[0])
        raise UserError(f"query {first} has no relevant candidate (grade > 0); pass allow_empty=True to score it 0")


def _ranks(s: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Tie-rule rank of candidate ``c[i]`` in row ``q[i]``: by counting when the queries have few
    judged candidates, else by one stable sort per judged row (cheaper from ~5 per query on)."""
    if len(q) == 0:
        return torch.zeros(0, dtype=torch.long)
    rows = torch.unique(q)
    if len(q) > _SORT_FROM * len(rows):
        return _ranks_by_sort(s, q, c, rows)
    return _ranks_by_count(s, q, c)


def _ranks_by_count(s: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """#{higher score} + #{equal score, lower index}, in chunks of pairs: O(#pairs * C)."""
    out = torch.empty(len(q), dtype=torch.long)
    step = max(1, _CHUNK // max(1, s.shape[1]))
    cols = torch.arange(s.shape[1])
    for a in range(0, len(q), step):
        qb, cb = q[a : a + step], c[a : a + step]
        rows = s[qb]
        mine = rows.gather(1, cb[:, None])
        before = (rows == mine) & (cols[None, :] < cb[:, None])
        out[a : a + step] = (rows > mine).sum(dim=1) + before.sum(dim=1)
    return out


def _ranks_by_sort(s: torch.Tensor, q: torch.Tensor, c: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The position in a stable descending sort of the row (= the tie rule), in chunks of rows."""
    out = torch.empty(len(q), dtype=torch.long)
    step = max(1, _CHUNK // max(1, s.shape[1]))
    for a in range(0, len(rows), step):
        rb = rows[a : a + step]
        order = torch.sort(s[rb], dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1]).expand(len(rb), -1))
        pick = (q >= rb[0]) & (q <= rb[-1])
        out[pick] = rank[torch.searchsorted(rb, q[pick]), c[pick]]
    return out


def _gain(grade: torch.Tensor, gain: str) -> torch.Tensor:
    if gain == "linear":
        return grade
    if gain == "exponential":
        return torch.pow(2.0, grade) - 1.0
    raise UserError(f"unknown NDCG gain {gain!r}; use one of {', '.join(GAINS)}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"k must be a positive integer, got {k!r}")


def ndcg(judged: Judged, k: int = 5, gain: str = "linear") -> torch.Tensor:
    """Per-query NDCG@k, float64 ``[Q]``.

    DCG@k = sum_{i<k} gain(rel_i) / log2(i + 2) over the ranked list (i from 0); IDCG@k = the same
    sum over the query's own grades sorted descending; IDCG = 0 -> 0. ``gain`` "linear" (rel, the
    number MMEB-V2 reports as ``ndcg_linear@5``) or "exponential" (2^rel - 1). Source: mmeb-v2.md §3
    "NDCG" (VLM2Vec ``metrics.py``), MMEB-V2 paper §4.1.2; the formula is Järvelin & Kekäläinen's."""
    _check_k(k)
    gains = _gain(judged.grade, gain)
    top = judged.rank < k
    dcg = torch.zeros(judged.num_queries, dtype=torch.float64)
    dcg.index_add_(0, judged.query[top], gains[top] / torch.log2(judged.rank[top].double() + 2.0))
    idcg = _ideal_dcg(judged.query, gains, judged.num_queries, k)
    safe = torch.where(idcg > 0, idcg, torch.ones_like(idcg))
    return torch.where(idcg > 0, dcg / safe, torch.zeros_like(dcg))


def _ideal_dcg(q: torch.Tensor, gains: torch.Tensor, num_queries: int, k: int) -> torch.Tensor:
    """Sum over each query's k largest gains (gain is monotone in the grade) / log2(i + 2)."""
    width = int(torch.bincount(q, minlength=num_queries).max()) if len(q) else 0
    mat = torch.zeros(num_queries, max(width, 1), dtype=torch.float64)
    order = torch.argsort(q, stable=True)
    qs = q[order]
    start = torch.cumsum(torch.bincount(q, minlength=num_queries), 0) - torch.bincount(q, minlength=num_queries)
    slot = torch.arange(len(qs)) - start[qs]
    mat[qs, slot] = gains[order]
    best = mat.sort(dim=1, descending=True).values[:, :k]
    return (best / torch.log2(torch.arange(best.shape[1], dtype=torch.float64) + 2.0)).sum(dim=1)


#: ``first_relevant_rank`` of a query without a relevant candidate: past any k
NO_RELEVANT = torch.iinfo(torch.long).max


def first_relevant_rank(judged: Judged) -> torch.Tensor:
    """``[Q]`` long: the best rank of a relevant candidate (grade > 0); ``NO_RELEVANT`` when none."""
    best = torch.full((judged.num_queries,), NO_RELEVANT, dtype=torch.long)
    rel = judged.grade > 0
    return best.scatter_reduce(0, judged.query[rel], judged.rank[rel], reduce="amin")


def hit_at_k(judged: Judged, k: int) -> torch.Tensor:
    """Per-query hit@k, float64 ``[Q]``: 1 if any relevant candidate is in the top k, else 0.
    With one relevant candidate this is what VLM2Vec and CLIP4Clip call Recall@k / R@k."""
    _check_k(k)
    return (first_relevant_rank(judged) < k).double()


def recall_at_k(judged: Judged, k: int) -> torch.Tensor:
    """Per-query fraction-of-relevant recall@k, float64 ``[Q]``: #relevant in the top k / #relevant
    (0 for a query with no relevant candidate). Equals hit@k when each query has one relevant."""
    _check_k(k)
    rel = judged.grade > 0
    n = torch.zeros(judged.num_queries, dtype=torch.float64)
    n.index_add_(0, judged.query[rel], torch.ones(int(rel.sum()), dtype=torch.float64))
    found = torch.zeros_like(n).index_add_(0, judged.query[rel], (judged.rank[rel] < k).double())
    return torch.where(n > 0, found / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))


def reciprocal_rank(judged: Judged, k: int | None = None) -> torch.Tensor:
    """Per-query reciprocal rank of the first relevant candidate, float64 ``[Q]``: 1 / (rank + 1),
    0 when there is none or (MRR@k) when it ranks at k or below. The mean is MRR."""
    if k is not None:
        _check_k(k)
    first = first_relevant_rank(judged)
    limit = judged.num_candidates if k is None else k
    return torch.where(first < limit, 1.0 / (first.double() + 1.0), torch.zeros(len(first), dtype=torch.float64))


def ndcg_at_k(scores, qrels: Sequence[Mapping[int, float]], k: int = 5, gain: str = "linear",
              allow_empty: bool = False) -> float:
    """Mean NDCG@k over the queries of ``scores [Q, C]`` with graded ``qrels`` (see ``ndcg``)."""
    return float(ndcg(judge(scores, qrels, allow_empty), k, gain).mean())


def ranking_report(scores, qrels: Sequence[Mapping[int, float]], ks: Sequence[int] = (1, 5, 10),
                   allow_empty: bool = False) -> dict:
    """Means over queries: ``ndcg_linear@k``, ``ndcg_exponential@k``, ``hit@k``, ``recall@k``
    (fraction of relevant) for each k, and ``mrr`` (no cut-off). Keys match MMEB-V2's score files."""
    judged = judge(scores, qrels, allow_empty)
    out = {}
    for k in ks:
        out[f"ndcg_linear@{k}"] = float(ndcg(judged, k, "linear").mean())
        out[f"ndcg_exponential@{k}"] = float(ndcg(judged, k, "exponential").mean())
        out[f"hit@{k}"] = float(hit_at_k(judged, k).mean())
        out[f"recall@{k}"] = float(recall_at_k(judged, k).mean())
    out["mrr"] = float(reciprocal_rank(judged).mean())
    return out


def ndcg_vlm2vec_convention(scores, qrels: Sequence[Mapping[int, float]], k: int = 5, gain: str = "linear",
                            ids: Sequence | None = None, allow_empty: bool = False) -> float:
    """Mean NDCG@k as VLM2Vec's code computes it -- a BUG reproduced on purpose, for comparison only.

    VLM2Vec's ``evaluate`` de-duplicates a query's labels with ``list(set(labels))`` but keeps the
    grades in qrels order, then pairs them with ``dict(zip(labels, grades))`` (mmeb-v2.md §3 "Bug to
    avoid copying"), so grades can land on the wrong documents. Here each query's labels are taken
    in its mapping's order (= qrels order), keyed by ``ids[candidate]`` (the corpus-ids VLM2Vec keys
    on; default: the candidate index), passed through Python's ``set`` and re-paired with the grades.
    IDCG is unchanged (same multiset of grades); ranking uses this module's tie rule. With binary
    (or uniform) grades the result equals ``ndcg_at_k``. CPython's set order of ints is fixed; for
    string ids it depends on PYTHONHASHSEED, as it did in VLM2Vec's runs."""
    rows, cols = _score_matrix(scores).shape
    _flatten_qrels(qrels, rows, cols)  # the same one-line errors before ids[c] is read
    if ids is not None and len(ids) != cols:
        raise UserError(f"ids has {len(ids)} entries but scores has {cols} candidates")
    shuffled = [_misaligned(list(_items(rel, qi)), ids, qi) for qi, rel in enumerate(qrels)]
    return ndcg_at_k(scores, shuffled, k, gain, allow_empty)


def _misaligned(pairs: list, ids: Sequence | None, qi: int) -> dict:
    """The query's ``{candidate: grade}`` after VLM2Vec's ``dict(zip(list(set(labels)), grades))``."""
    key: dict = {}
    for c, _ in pairs:
        label = ids[c] if ids is not None else c
        if label in key:
            raise UserError(f"ids give candidates {key[label]} and {c} of query {qi} the same id {label!r}")
        key[label] = c
    labels = list(set(key))
    return {key[label]: grade for label, (_, grade) in zip(labels, pairs)}


def set_retrieval(similarity, text_video: Sequence[int], ks: Sequence[int] = (1, 5, 10), v2t: str = "text") -> dict:
    """Text->video and video->text retrieval from ``similarity [T, V]`` (text t against video v) and
    ``text_video[t]`` = the index of text t's video (several texts may share a video).

    t2v R@k: the text's video is in its top k videos. v2t R@k, ``v2t="text"``: any of the video's
    texts is in the video's top k of all T texts; ``v2t="group"``: each video's texts are pooled by
    their best score and the video's own group must be in the top k of the V groups (CLIP4Clip's
    multi-sentence path, ``tensor_video_to_text_sim``). The two agree when every video has one text
    (MSR-VTT 1k-A). ``MdR`` = median 1-based rank, the lower middle one for an even count (as
    CLIP4Clip's ``torch.median``); ``MnR`` = mean. LLaVE reports R@1/5/10 through CLIP4Clip
    (anchors-vlm2vec-llave.md §2.7). Every video needs a text. Returns ``{"t2v": {...}, "v2t": {...}}``."""
    sim = _score_matrix(similarity)
    videos = _text_videos(text_video, sim.shape)
    t2v = judge(sim, [{v: 1} for v in videos.tolist()])
    if v2t == "text":
        texts: list[dict] = [{} for _ in range(sim.shape[1])]
        for t, v in enumerate(videos.tolist()):
            texts[v][t] = 1
        back = judge(sim.T, texts)
    elif v2t == "group":
        group = torch.full((sim.shape[1], sim.shape[1]), float("-inf"), dtype=sim.dtype)
        group.scatter_reduce_(1, videos[None, :].expand(sim.shape[1], -1), sim.T.contiguous(), reduce="amax")
        back = judge(group, [{v: 1} for v in range(sim.shape[1])])
    else:
        raise UserError(f"unknown v2t rule {v2t!r}; use 'text' or 'group'")
    return {"t2v": _set_scores(t2v, ks), "v2t": _set_scores(back, ks)}


def _text_videos(text_video: Sequence[int], shape) -> torch.Tensor:
    if len(text_video) != shape[0]:
        raise UserError(f"text_video has {len(text_video)} entries but similarity has {shape[0]} texts")
    bad = [v for v in text_video if isinstance(v, bool) or not isinstance(v, Integral) or not 0 <= v < shape[1]]
    if bad:
        raise UserError(f"text_video entry {bad[0]!r} is not a video index in [0, {shape[1]})")
    videos = torch.tensor([int(v) for v in text_video], dtype=torch.long)
    empty = (torch.bincount(videos, minlength=shape[1]) == 0).nonzero()
    if len(empty):
        raise UserError(f"video {int(empty[0])} has no text in text_video; every video needs at least one")
    return videos


def _set_scores(judged: Judged, ks: Sequence[int]) -> dict:
    rank = first_relevant_rank(judged).double() + 1.0
    out = {f"R@{k}": float(hit_at_k(judged, k).mean()) for k in ks}
    out["MdR"] = float(rank.median())  # torch: the lower of the two middle ranks when even, as CLIP4Clip
    out["MnR"] = float(rank.mean())
    return out
