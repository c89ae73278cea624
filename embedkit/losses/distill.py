"""Similarity-distribution distillation around any contrastive loss (UniME stage 1).

UniME (Gu et al. 2025, arXiv 2504.17432, §3.1, "textual discriminative knowledge distillation")
trains the student so that its in-batch similarity distribution matches a strong text embedder's
(NV-Embed-V2). Here, for each query q_i of ``rows`` and the candidates c of the gathered batch
(``candidates(p, n)``: every positive, then every hard negative):

    P_s(c | q_i) = softmax_c( s(q_i, c) / τ_s )          the student, s its similarity (cosine)
    P_t(c | q_i) = softmax_c( t(q_i, c) / τ_t )          the teacher: the dot product of its stored
                                                         embeddings (``TeacherBatch``), no gradient
    KL_q2c = 1/|rows| Σ_i KL( P_t(·|q_i) || P_s(·|q_i) )

    total  = weight · inner(q, p, n) + distill_weight · mean over ``directions`` of KL_<direction>

The direction of the KL is KL(teacher || student), the forward KL of knowledge distillation (Hinton
et al. 2015, arXiv 1503.02531: cross-entropy to the teacher's soft targets, which differs from this KL
by the teacher's entropy, a constant) and the form the project's research notes give for UniME
(users-and-frontier.md F8: "KL(teacher ‖ student) over the in-batch similarity distribution"); UniME's
exact notation is [unverified] here. ``c2q``: for each positive p_i of ``rows`` the candidates are all
queries of the batch (as the contrastive core's ``bidirectional``), student and teacher alike.

The wrapper sees embeddings only: it composes with every contrastive loss (``loss.inner``), with
Matryoshka inside it (``loss=distill loss.inner=matryoshka``: the KL at the full size, the contrastive
loss at every size), with GradCache (the KL is a function of the cached embeddings like the inner loss)
and with cross-device negatives (``rows``: only this rank's rows; the teacher data is gathered like the
embeddings). False-negative masking (``mask``) applies to the inner, contrastive part only: the KL keeps
every candidate, since the teacher's distribution is the soft target that already gives a near-copy of
the positive its share, which is the point of distilling it.

Defaults: τ_s = τ_t = 0.02 (the student's InfoNCE τ; UniME's values [unverified]); weight = distill_weight
= 1 [unverified]. Parts: the inner loss's parts, ``contrastive``, ``distill`` (and ``distill_<direction>``).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from embedkit.config.registry import register
from embedkit.losses.base import Loss, LossOutput, call_loss, candidates, row_slice
from embedkit.losses.matryoshka import inner_loss
from embedkit.losses.similarity import similarity_for
from embedkit.losses.teacher import TeacherBatch, kl_rows, require

DIRECTIONS = ("q2c", "c2q")


def check_wrapper(params: dict, temperatures: tuple[str, ...], weights: tuple[str, ...]) -> None:
    """The checks the teacher wrappers share: positive temperatures, non-negative weights."""
    for key in temperatures:
        if key in params and params[key] <= 0:
            raise ValueError(f"{key}: must be positive, got {params[key]}")
    for key in weights:
        if key in params and params[key] < 0:
            raise ValueError(f"{key}: must be >= 0, got {params[key]}")


def distill_kl(q, p, n, teacher: TeacherBatch, rows: slice | None, student_temperature: float,
               teacher_temperature: float, direction: str) -> torch.Tensor:
    """KL(P_t || P_s) of one direction over ``rows`` of the (gathered) batch (module docstring)."""
    own = row_slice(rows, q.shape[0])
    sim = similarity_for(q, "mean")
    tq, tc = teacher.queries, teacher.candidates
    if direction == "q2c":
        student = sim(q[own], candidates(p, n))
        target = tq[own].double() @ tc.double().T
    else:  # c2q: positive p_i against every query
        student = sim(q, p[own]).T
        target = tc[: p.shape[0]][own].double() @ tq.double().T
    return kl_rows(target / teacher_temperature, student / student_temperature)


@register("loss", "distill", nested={"inner": "loss"})
class Distill(Loss):
    """Inputs q [B,D], p [B,D], n [B,K,D] | None, ``teacher=TeacherBatch`` with embeddings. Output:
    weight · inner + distill_weight · KL(teacher || student) of the in-batch similarity distributions.

    ``directions``: which distributions are matched, ``q2c`` (each query over all candidates) and/or
    ``c2q`` (each positive over all queries); the KL is their mean.
    """

    needs_teacher = True  # the module refuses, in one line naming the shards, a batch without teacher data

    def __init__(
        self,
        inner: Loss | str = "infonce",
        weight: float = 1.0,
        distill_weight: float = 1.0,
        student_temperature: float = 0.02,
        teacher_temperature: float = 0.02,
        directions: Optional[list[Literal["q2c", "c2q"]]] = None,
    ):
        super().__init__()
        directions = list(directions) if directions is not None else ["q2c"]
        self.check_config({"weight": weight, "distill_weight": distill_weight, "directions": directions,
                           "student_temperature": student_temperature, "teacher_temperature": teacher_temperature})
        self.inner = inner_loss(inner)
        self.weight, self.distill_weight = float(weight), float(distill_weight)
        self.student_temperature, self.teacher_temperature = float(student_temperature), float(teacher_temperature)
        self.directions = directions

    @staticmethod
    def check_config(params: dict) -> None:
        check_wrapper(params, ("student_temperature", "teacher_temperature"), ("weight", "distill_weight"))
        directions = params.get("directions")
        if directions is not None and (not directions or any(d not in DIRECTIONS for d in directions)
                                       or len(set(directions)) != len(directions)):
            raise ValueError(f"directions: a non-empty list of q2c, c2q without repeats, got {directions}")

    def forward(self, q, p, n=None, rows=None, mask=None, teacher=None) -> LossOutput:
        teacher = require(teacher, "distill")
        inner = call_loss(self.inner, q, p, n, rows=rows, mask=mask)
        kls = {d: distill_kl(q, p, n, teacher, rows, self.student_temperature, self.teacher_temperature, d)
               for d in self.directions}
        kl = sum(kls.values()) / len(kls)
        parts = {**inner.parts, "contrastive": inner.loss.detach(), "distill": kl.detach()}
        if len(kls) > 1:
            parts.update({f"distill_{d}": v.detach() for d, v in kls.items()})
        return LossOutput(self.weight * inner.loss + self.distill_weight * kl, parts)
