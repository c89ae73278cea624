"""Retrieval scoring on embeddings: pure functions, no model, no files.

MMEB (VLM2Vec, arXiv 2410.05160, Sec. 3 and its eval script) scores every query against its own
row's candidate list, where candidate 0 is the answer:

    score_rc = cos(q_r, c_rc)  (or the dot product when embeddings are not normalised)
    hit_r    = [argmax_c score_rc == 0]      ties go to the lowest index, as numpy/torch argmax do
    P@1      = mean_r hit_r                  per dataset

Aggregation: the mean of the per-dataset P@1 within each meta-task, over the IND and over the OOD
datasets, and ``overall`` = the mean over DATASETS (not the mean of the meta-task means), which is
how the paper's "Overall" column is computed.

Trap kept from the reference on purpose: with ties resolved to index 0, an encoder that maps
everything to one vector scores P@1 = 1.0. ``ties`` counts the rows whose answer ties with another
candidate at the top, so a degenerate encoder is visible in the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from embedkit.losses.similarity import maxsim_similarity


def row_scores(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_index: Sequence[int],
    candidate_index: Sequence[Sequence[int]],
    normalize: bool = True,
    block: int = 64,
) -> torch.Tensor:
    """Scores ``[R, Cmax]`` of each row's query against that row's candidates.

    ``queries [Nq, D]`` and ``candidates [Nc, D]`` hold the unique encoded items (token-vector sets
    ``[N, T, d]`` of a multi-vector head are scored by exact MaxSim, ``losses.similarity.maxsim_similarity``); row r is the query
    ``queries[query_index[r]]`` with candidates ``candidates[candidate_index[r]]`` (answer first).
    Rows with fewer candidates than the longest are padded with -inf. Rows are processed in blocks so
    memory stays at ``block * Cmax * D`` (``block`` is lowered so that this stays under ``row_block``'s
    budget: a token set is ``T * d`` numbers per candidate).
    """
    if len(query_index) != len(candidate_index):
        raise ValueError("query_index and candidate_index must have one entry per row")
    q = queries.float()
    c = candidates.float()
    if normalize:
        q = F.normalize(q, dim=-1)
        c = F.normalize(c, dim=-1)
    block = min(block, row_block(candidate_index, c[0].numel() if len(c) else 1))
    return scores_by_row(q, c, query_index, candidate_index, _row_similarity, block)


def row_block(candidate_index: Sequence[Sequence[int]], per_candidate: int, budget: int = 1 << 26) -> int:
    """Rows per block of ``scores_by_row`` whose gathered candidates hold at most ``budget`` numbers
    (256 MiB of float32) when each candidate is ``per_candidate`` numbers; at least 1."""
    width = max((len(ci) for ci in candidate_index), default=1)
    return max(1, budget // max(1, width * per_candidate))


def _row_similarity(qb: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """``[b, Cmax]``: each row's query against its own candidates; dot product, or MaxSim for token sets."""
    if qb.dim() == 3:
        return torch.stack([maxsim_similarity(qb[i : i + 1], cb[i])[0] for i in range(len(qb))])
    return torch.einsum("bd,bcd->bc", qb, cb)


def scores_by_row(q: torch.Tensor, c: torch.Tensor, query_index: Sequence[int],
                  candidate_index: Sequence[Sequence[int]], score, block: int = 64) -> torch.Tensor:
    """``[R, Cmax]`` of ``score(q_rows [b, ...], c_rows [b, Cmax, ...]) -> [b, Cmax]`` over blocks of
    rows, -inf past a row's candidates: the row layout every MMEB scorer shares (float, quantised)."""
    rows = len(query_index)
    width = max((len(ci) for ci in candidate_index), default=0)
    out = torch.full((rows, width), float("-inf"))
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        idx = torch.zeros(stop - start, width, dtype=torch.long)
        valid = torch.zeros(stop - start, width, dtype=torch.bool)
        for i, ci in enumerate(candidate_index[start:stop]):
            idx[i, : len(ci)] = torch.as_tensor(list(ci), dtype=torch.long)
            valid[i, : len(ci)] = True
        s = score(q[torch.as_tensor(list(query_index[start:stop]), dtype=torch.long)], c[idx]).float()
        out[start:stop] = torch.where(valid, s, torch.full_like(s, float("-inf")))
    return out


def hits_at_1(scores: torch.Tensor) -> torch.Tensor:
    """``[R]`` bool: the top-scored candidate is candidate 0 (first index wins a tie)."""
    return scores.argmax(dim=1) == 0


def top_ties(scores: torch.Tensor) -> torch.Tensor:
    """``[R]`` bool: candidate 0 is at the top but shares the top score with another candidate."""
    top = scores.max(dim=1).values
    return (scores[:, 0] == top) & ((scores == top[:, None]).sum(dim=1) > 1)


def precision_at_1(scores: torch.Tensor) -> dict:
    """The reference's per-dataset score: ``{"acc", "num_correct", "num_pred"}``."""
    hits = hits_at_1(scores)
    n = int(hits.numel())
    correct = int(hits.sum())
    return {"acc": correct / n if n else 0.0, "num_correct": correct, "num_pred": n}


def ranking_metrics(scores: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k and MRR, one relevant candidate per row (candidate 0): with ``rank_r`` the number of
    the row's candidates scored strictly above its answer (a tie goes to the answer, as in
    ``hits_at_1``, so recall@1 == P@1), recall@k = mean_r [rank_r < k], MRR = mean_r 1 / (rank_r + 1).
    -inf marks the padding past a row's candidates.

    Not torchmetrics' ``RetrievalRecall``/``RetrievalMRR``: they count an answer only when its score
    is > 0 (they read scores as probabilities), so a negative cosine or MaxSim lost hits (see
    docs/bugs-and-fixes.md)."""
    if scores.shape[0] == 0:
        return {}
    rank = (scores > scores[:, :1]).sum(dim=1).float()
    out = {f"recall@{k}": float((rank < k).float().mean()) for k in ks}
    out["mrr"] = float((1.0 / (rank + 1.0)).mean())
    return out


def aggregate(per_dataset: dict[str, float], manifest: dict[str, dict]) -> dict:
    """Means of per-dataset P@1: per meta-task, IND, OOD and overall (over datasets).

    ``manifest[name]`` gives ``meta_task`` and ``split`` (IND/OOD). Groups with no evaluated
    dataset are left out; ``counts`` says how many datasets each mean covers.
    """
    unknown = [n for n in per_dataset if n not in manifest]
    if unknown:
        raise ValueError(f"datasets not in the manifest: {', '.join(unknown)}")
    groups: dict[str, list[float]] = {}
    for name, acc in per_dataset.items():
        info = manifest[name]
        groups.setdefault(info["meta_task"], []).append(acc)
        groups.setdefault(info["split"], []).append(acc)
    mean = {g: sum(v) / len(v) for g, v in groups.items()}
    values = list(per_dataset.values())
    return {
        "meta_task": {g: mean[g] for g in _ordered(manifest, "meta_task") if g in mean},
        "IND": mean.get("IND"),
        "OOD": mean.get("OOD"),
        "overall": sum(values) / len(values) if values else None,
        "counts": {g: len(v) for g, v in groups.items()} | {"overall": len(values)},
    }


def _ordered(manifest: dict[str, dict], field: str) -> list[str]:
    seen: list[str] = []
    for info in manifest.values():
        if info[field] not in seen:
            seen.append(info[field])
    return seen
