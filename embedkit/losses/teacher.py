"""Teacher data as a loss sees it: ``TeacherBatch``, the ``teacher=`` keyword of the loss contract.

A teacher (``embedkit teach``, ``mining/teacher.py``) stored, per example, its embeddings of the query,
the positive and the example's own hard negatives, and/or a judge's scores of the example's own
candidates (positive first). The batch layout mirrors the student's (``losses/base.py``):

    queries     [B, Dt]        the teacher's embedding of each query (Dt: the teacher's own size)
    candidates  [B + B*K, Dt]  of every candidate in ``candidates(p, n)`` order: the positives, then
                               each example's K negative slots (cycled or borrowed as the batch does)
    scores      [B, 1 + K]     the judge's score of each example's positive and its K negative slots;
                               NaN for a slot the judge never saw (a negative borrowed from another
                               example's positive)

Under cross-device negatives ``distributed/loss.py`` gathers it into the global layout (every rank's
queries; every rank's positives, then every rank's negatives; every rank's score rows), like the
embeddings but without gradients: a teacher is fixed. Either field may be None; a loss that needs one
says so in one line (``require``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from embedkit.errors import UserError


@dataclass
class TeacherBatch:
    queries: torch.Tensor | None = None
    candidates: torch.Tensor | None = None
    scores: torch.Tensor | None = None

    @property
    def has_embeddings(self) -> bool:
        return self.queries is not None and self.candidates is not None


def require(teacher: TeacherBatch | None, loss: str, embeddings: bool = True) -> TeacherBatch:
    """``teacher``, or a one-line ``UserError`` when the batch carries none (or no embeddings where
    ``embeddings`` are needed)."""
    if teacher is None or (embeddings and not teacher.has_embeddings) or (
            not embeddings and not teacher.has_embeddings and teacher.scores is None):
        what = "teacher embeddings" if embeddings else "teacher embeddings or judge scores"
        raise UserError(f"loss={loss}: the batch carries no {what}: train on shards made by "
                        "`embedkit teach model=TEACHER shards=SRC out=DST`")
    return teacher


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of KL(P_t || P_s) = Σ_c P_t(c) (log P_t(c) - log P_s(c)), with P = softmax of each
    row's logits over its ``valid`` columns (bool, same shape; None: all). Invalid columns leave both
    softmaxes (they contribute 0, not NaN). The teacher side carries no gradient."""
    t = teacher_logits.detach().to(student_logits.dtype)
    if valid is not None:
        t = t.masked_fill(~valid, float("-inf"))
        student_logits = student_logits.masked_fill(~valid, float("-inf"))
    log_t = torch.log_softmax(t, dim=1)
    log_s = torch.log_softmax(student_logits, dim=1)
    terms = log_t.exp() * (log_t - log_s)
    if valid is not None:
        terms = torch.where(valid, terms, torch.zeros_like(terms))
    return terms.sum(dim=1).mean()
