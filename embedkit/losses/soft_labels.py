"""Soft-label alignment over each query's own candidates, around any contrastive loss (UniME-V2).

UniME-V2 (Gu et al. 2025, AAAI 2026, "MLLM-as-a-Judge"; arXiv id [unverified]) scores each query's candidates with a
judge (an MLLM's P(yes)) and aligns the embedder's similarities with those soft labels (the research
notes, users-and-frontier.md §2.2: "soft-label similarity-matrix alignment"). Here, for each query q_i of
``rows`` and its OWN candidates (its positive p_i and the K negative slots n_i1..n_iK of its example):

    P_s(j | q_i) = softmax_j( s(q_i, c_ij) / τ_s )          the student over [p_i, n_i1, ..., n_iK]
    P_j(j | q_i) = softmax_j( score_ij / τ_j )              the judge's scores of the same candidates
    L_soft = 1/|rows| Σ_i KL( P_j(·|q_i) || P_s(·|q_i) )

    total  = weight · inner(q, p, n) + soft_weight · L_soft

``score_ij`` is the stored judge score (``embedkit teach judge=NAME``); without judge scores, a
teacher embedder's own similarities of the same pairs (``TeacherBatch`` embeddings) stand in. A slot
the judge never saw (a negative the batch borrowed from another example's positive: NaN) leaves both
softmaxes. The KL direction is KL(judge || student), as in ``distill`` (forward KL of knowledge
distillation, Hinton et al. 2015); UniME-V2's exact divergence and τ are [unverified] here. With K = 0
(no negatives) each distribution has one candidate and the term is 0.

Composition as ``distill``: GradCache, Matryoshka inside (``loss.inner=matryoshka``), cross-device
``rows``. False-negative masking applies to the inner contrastive part only: a near-copy of the
positive among a query's own candidates is exactly what the judge's soft label grades, so the
alignment keeps it (with its high score) instead of dropping it.

Defaults: τ_s = 0.02 (the student's InfoNCE τ), τ_j = 1.0 (scores such as P(yes) in [0, 1] or
cosines, softened little) [unverified]; weight = soft_weight = 1 [unverified].
Parts: the inner loss's parts, ``contrastive``, ``soft_labels``.
"""

from __future__ import annotations

import torch

from embedkit.config.registry import register
from embedkit.losses.base import Loss, LossOutput, call_loss, candidates, row_slice
from embedkit.losses.distill import check_wrapper
from embedkit.losses.matryoshka import inner_loss
from embedkit.losses.similarity import similarity_for
from embedkit.losses.teacher import TeacherBatch, kl_rows, require


def own_columns(batch: int, k: int, own: slice) -> torch.Tensor:
    """Long [rows, 1 + K]: the candidate indices (``candidates(p, n)`` order) of each row's positive and
    K negative slots: i, then batch + i*K + j."""
    i = torch.arange(own.start, own.stop)[:, None]
    return torch.cat([i, batch + i * k + torch.arange(k)[None, :]], dim=1)


def own_scores(q, p, n, teacher: TeacherBatch, own: slice) -> torch.Tensor:
    """[rows, 1 + K] the judge's scores of each row's own candidates, else the teacher embedder's dot
    products of them (NaN where unknown)."""
    if teacher.scores is not None:
        return teacher.scores[own].double()
    k = 0 if n is None else n.shape[1]
    cols = own_columns(p.shape[0], k, own).to(teacher.candidates.device)
    return (teacher.queries[own].double()[:, None, :] * teacher.candidates.double()[cols]).sum(-1)


def student_own(q, p, n, own: slice) -> torch.Tensor:
    """[rows, 1 + K] the student's similarity of each row's query to its positive and its K negatives."""
    k = 0 if n is None else n.shape[1]
    if q.dim() == 2:  # single vectors: one gather, the dot product
        cols = own_columns(p.shape[0], k, own).to(q.device)
        return (q[own][:, None, :] * candidates(p, n)[cols]).sum(-1)
    sim = similarity_for(q, "mean")  # token sets: MaxSim, row by row
    pos = torch.stack([sim(q[i : i + 1], p[i : i + 1])[0, 0] for i in range(own.start, own.stop)])
    if k == 0:
        return pos[:, None]
    neg = torch.stack([sim(q[i : i + 1], n[i])[0] for i in range(own.start, own.stop)])
    return torch.cat([pos[:, None], neg], dim=1)


@register("loss", "soft_labels", nested={"inner": "loss"})
class SoftLabels(Loss):
    """Inputs q [B,D], p [B,D], n [B,K,D] | None, ``teacher=TeacherBatch`` with judge scores (or teacher
    embeddings). Output: weight · inner + soft_weight · KL(judge || student) over each query's own
    candidates."""

    needs_teacher = True  # the module refuses, in one line naming the shards, a batch without teacher data

    def __init__(self, inner: Loss | str = "infonce", weight: float = 1.0, soft_weight: float = 1.0,
                 student_temperature: float = 0.02, judge_temperature: float = 1.0):
        super().__init__()
        self.check_config({"weight": weight, "soft_weight": soft_weight, "student_temperature": student_temperature,
                           "judge_temperature": judge_temperature})
        self.inner = inner_loss(inner)
        self.weight, self.soft_weight = float(weight), float(soft_weight)
        self.student_temperature, self.judge_temperature = float(student_temperature), float(judge_temperature)

    @staticmethod
    def check_config(params: dict) -> None:
        check_wrapper(params, ("student_temperature", "judge_temperature"), ("weight", "soft_weight"))

    def forward(self, q, p, n=None, rows=None, mask=None, teacher=None) -> LossOutput:
        teacher = require(teacher, "soft_labels", embeddings=False)
        inner = call_loss(self.inner, q, p, n, rows=rows, mask=mask)
        own = row_slice(rows, q.shape[0])
        target = own_scores(q, p, n, teacher, own).to(q.device)
        valid = ~torch.isnan(target)
        soft = kl_rows(torch.nan_to_num(target) / self.judge_temperature,
                       student_own(q, p, n, own) / self.student_temperature, valid)
        parts = {**inner.parts, "contrastive": inner.loss.detach(), "soft_labels": soft.detach()}
        return LossOutput(self.weight * inner.loss + self.soft_weight * soft, parts)
