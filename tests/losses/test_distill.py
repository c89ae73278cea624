"""``loss=distill`` and ``loss=soft_labels``: the formulas against a direct computation written here
(loops over rows and columns, math.log / math.exp), the keyword plumbing, masking, configs, GradCache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from embedkit.config import registry, schema
from embedkit.config.loader import compose
from embedkit.errors import ConfigError, UserError
from embedkit.losses.base import CandidateMask, call_loss
from embedkit.losses.distill import Distill
from embedkit.losses.infonce import InfoNCE
from embedkit.losses.soft_labels import SoftLabels
from embedkit.losses.teacher import TeacherBatch

B, K, D, DT = 4, 2, 8, 5


def batch(seed: int = 0, k: int = K):
    g = torch.Generator().manual_seed(seed)
    q, p = (F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    n = F.normalize(torch.randn(B, k, D, generator=g, dtype=torch.float64), dim=-1)
    tq = F.normalize(torch.randn(B, DT, generator=g, dtype=torch.float64), dim=-1)
    tc = F.normalize(torch.randn(B + B * k, DT, generator=g, dtype=torch.float64), dim=-1)
    scores = torch.rand(B, 1 + k, generator=g, dtype=torch.float64)
    return q, p, n, TeacherBatch(tq, tc, scores)


def kl(target: list[float], student: list[float]) -> float:
    """KL(softmax(target) || softmax(student)) of two lists of logits, by hand."""
    zt = math.log(sum(math.exp(x) for x in target))
    zs = math.log(sum(math.exp(x) for x in student))
    return sum(math.exp(t - zt) * ((t - zt) - (s - zs)) for t, s in zip(target, student))


def dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def reference_distill(q, p, n, t: TeacherBatch, ts: float, tt: float, direction: str, rows=range(B)) -> float:
    cands = [p[j] for j in range(B)] + [n[i, m] for i in range(B) for m in range(n.shape[1])]
    total = 0.0
    for i in rows:
        if direction == "q2c":
            student = [dot(q[i], c) / ts for c in cands]
            target = [dot(t.queries[i], t.candidates[c]) / tt for c in range(len(cands))]
        else:
            student = [dot(q[j], p[i]) / ts for j in range(B)]
            target = [dot(t.queries[j], t.candidates[i]) / tt for j in range(B)]
        total += kl(target, student)
    return total / len(rows)


def reference_infonce(q, p, n, tau: float) -> float:
    cands = [p[j] for j in range(B)] + [n[i, m] for i in range(B) for m in range(n.shape[1])]
    total = 0.0
    for i in range(B):
        logits = [dot(q[i], c) / tau for c in cands]
        total += math.log(sum(math.exp(x) for x in logits)) - logits[i]
    return total / B


@pytest.mark.parametrize("directions", [["q2c"], ["c2q"], ["q2c", "c2q"]])
def test_distill_equals_the_direct_computation(directions):
    q, p, n, t = batch(1)
    loss = Distill(InfoNCE(temperature=0.05), weight=0.7, distill_weight=1.3, student_temperature=0.1,
                   teacher_temperature=0.2, directions=directions)
    out = loss(q, p, n, teacher=t)
    kls = [reference_distill(q, p, n, t, 0.1, 0.2, d) for d in directions]
    expected = 0.7 * reference_infonce(q, p, n, 0.05) + 1.3 * sum(kls) / len(kls)
    assert abs(out.loss.item() - expected) < 1e-6
    assert abs(out.parts["distill"].item() - sum(kls) / len(kls)) < 1e-6
    assert {"contrastive", "distill", "q2c", "temperature"} <= set(out.parts)


def test_distill_is_zero_kl_when_the_teacher_is_the_student():
    q, p, n, _ = batch(2)
    same = TeacherBatch(q, torch.cat([p, n.reshape(-1, D)]))
    out = Distill(InfoNCE(), student_temperature=0.1, teacher_temperature=0.1)(q, p, n, teacher=same)
    assert abs(out.parts["distill"].item()) < 1e-12
    other = Distill(InfoNCE(), student_temperature=0.1, teacher_temperature=0.3)(q, p, n, teacher=same)
    assert other.parts["distill"].item() > 1e-4  # its own temperature: the check can fail


@pytest.mark.parametrize("name", ["distill", "soft_labels"])
def test_local_rows_average_to_the_full_batch(name):
    q, p, n, t = batch(3)
    loss = registry.build("loss", schema._component("loss", {"name": name}, "infonce", "loss"), embedding_dim=D)
    full = loss(q, p, n, teacher=t).loss
    halves = [loss(q, p, n, rows=slice(0, 2), teacher=t).loss, loss(q, p, n, rows=slice(2, 4), teacher=t).loss]
    assert abs(full.item() - sum(h.item() for h in halves) / 2) < 1e-9
    rows_ref = reference_distill(q, p, n, t, 0.02, 0.02, "q2c", rows=range(2, 4))
    if name == "distill":
        assert abs(loss(q, p, n, rows=slice(2, 4), teacher=t).parts["distill"].item() - rows_ref) < 1e-6


def reference_soft(q, p, n, scores, ts: float, tj: float) -> float:
    total = 0.0
    for i in range(B):
        own = [p[i]] + [n[i, m] for m in range(n.shape[1])]
        keep = [j for j in range(len(own)) if not math.isnan(float(scores[i][j]))]
        total += kl([float(scores[i][j]) / tj for j in keep], [dot(q[i], own[j]) / ts for j in keep])
    return total / B


def test_soft_labels_equal_the_direct_computation():
    q, p, n, t = batch(4)
    out = SoftLabels(InfoNCE(temperature=0.05), weight=0.5, soft_weight=2.0, student_temperature=0.1,
                     judge_temperature=0.3)(q, p, n, teacher=t)
    soft = reference_soft(q, p, n, t.scores, 0.1, 0.3)
    assert abs(out.parts["soft_labels"].item() - soft) < 1e-6
    assert abs(out.loss.item() - (0.5 * reference_infonce(q, p, n, 0.05) + 2.0 * soft)) < 1e-6


def test_soft_labels_leave_out_unscored_slots_and_fall_back_to_teacher_embeddings():
    q, p, n, t = batch(5)
    scores = t.scores.clone()
    scores[1, 2] = float("nan")  # a borrowed negative: the judge never saw it
    loss = SoftLabels(InfoNCE(), student_temperature=0.1, judge_temperature=0.3)
    out = loss(q, p, n, teacher=TeacherBatch(scores=scores))
    assert math.isfinite(out.loss.item())
    assert abs(out.parts["soft_labels"].item() - reference_soft(q, p, n, scores, 0.1, 0.3)) < 1e-6
    # no judge scores: the teacher embedder's similarities of the same pairs
    by_emb = [[dot(t.queries[i], t.candidates[c]) for c in [i] + [B + i * K + m for m in range(K)]] for i in range(B)]
    out = loss(q, p, n, teacher=TeacherBatch(t.queries, t.candidates))
    assert abs(out.parts["soft_labels"].item() - reference_soft(q, p, n, by_emb, 0.1, 0.3)) < 1e-6


def test_soft_labels_with_a_one_hot_judge_and_no_in_batch_columns_is_cross_entropy():
    """A judge certain of the positive (score 1, negatives -inf-like) makes the term the cross-entropy over
    the query's own candidates."""
    q, p, n, _ = batch(6)
    scores = torch.tensor([[1.0] + [-1e9] * K] * B, dtype=torch.float64)
    out = SoftLabels(InfoNCE(), student_temperature=0.1)(q, p, n, teacher=TeacherBatch(scores=scores))
    ce = sum(math.log(sum(math.exp(dot(q[i], c) / 0.1) for c in [p[i], *n[i]])) - dot(q[i], p[i]) / 0.1
             for i in range(B)) / B
    assert abs(out.parts["soft_labels"].item() - ce) < 1e-6


@pytest.mark.parametrize("name", ["distill", "soft_labels"])
def test_a_batch_without_teacher_data_is_one_line(name):
    q, p, n, _ = batch(7)
    loss = registry.build("loss", schema._component("loss", {"name": name}, "infonce", "loss"), embedding_dim=D)
    with pytest.raises(UserError) as info:
        loss(q, p, n)
    assert "\n" not in str(info.value) and "embedkit teach" in str(info.value)


def test_call_loss_passes_teacher_only_where_taken():
    q, p, n, t = batch(8)
    plain = InfoNCE()
    assert torch.equal(call_loss(plain, q, p, n, teacher=t).loss, plain(q, p, n).loss)
    assert "distill" in call_loss(Distill(plain), q, p, n, teacher=t).parts


def test_masking_reaches_the_contrastive_part_only():
    q, p, n, t = batch(9)
    keys = torch.arange(B + B * K)
    keys[B + 0] = keys[2]  # example 0's first negative copies example 2's positive
    mask = CandidateMask(keys)
    loss = Distill(InfoNCE(temperature=0.05))
    masked, unmasked = loss(q, p, n, mask=mask, teacher=t), loss(q, p, n, teacher=t)
    assert abs(masked.parts["distill"].item() - unmasked.parts["distill"].item()) < 1e-12  # the KL keeps every column
    assert abs(masked.parts["contrastive"].item() - InfoNCE(temperature=0.05)(q, p, n, mask=mask).loss.item()) < 1e-12
    assert masked.parts["masked_negatives"].item() >= 1


def test_configs_build_and_bad_values_name_the_key():
    cfg = compose(["recipe=demo", "loss=distill", "loss.inner=hardness_weighted", "loss.directions=[q2c,c2q]"])
    loss = registry.build("loss", cfg["loss"], embedding_dim=D)
    assert loss.directions == ["q2c", "c2q"] and type(loss.inner).__name__ == "HardnessWeighted"
    cfg = compose(["recipe=demo", "loss=soft_labels", "loss.inner=matryoshka", "loss.inner.dims=[4,8]"])
    assert registry.build("loss", cfg["loss"], embedding_dim=D).inner.dims == [4, 8]
    for overrides, key in ((["loss=distill", "loss.teacher_temperature=0"], "loss.teacher_temperature"),
                           (["loss=distill", "loss.directions=[q2c,q2c]"], "loss.directions"),
                           (["loss=soft_labels", "loss.soft_weight=-1"], "loss.soft_weight")):
        with pytest.raises(ConfigError) as info:
            compose(["recipe=demo", *overrides])
        assert str(info.value).startswith(key + ":") and "\n" not in str(info.value)


@pytest.mark.parametrize("inner", ["infonce", "hardness_weighted"])
@pytest.mark.parametrize("name", ["distill", "soft_labels"])
def test_gradcache_equals_the_full_batch(name, inner):
    """Chunked (GradCache, dropout replayed) == one graph, the wrapper around InfoNCE and LLaVE's loss."""
    from torch import nn

    from tests.training.test_gradcache import one_step

    def run(cached: bool):
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, D))
        block = schema._component("loss", {"name": name, "inner": inner, "directions": ["q2c", "c2q"]}
                                  if name == "distill" else {"name": name, "inner": inner}, "infonce", "loss")
        loss = registry.build("loss", block, embedding_dim=D)
        x = torch.randn(8, 6)
        chunks = list(x.split(2)) + list((x.flip(0) + 0.1).split(2)) + list((x.roll(3, 0) - 0.2).split(2))
        g = torch.Generator().manual_seed(1)
        teacher = TeacherBatch(F.normalize(torch.randn(8, DT, generator=g), dim=-1),
                               F.normalize(torch.randn(16, DT, generator=g), dim=-1), torch.rand(8, 2, generator=g))

        def loss_of(e):
            e = [F.normalize(x, dim=-1) for x in e]
            return loss(torch.cat(e[:4]), torch.cat(e[4:8]), torch.cat(e[8:]).view(8, 1, D), teacher=teacher)

        out = one_step(enc, chunks, loss_of, cached)
        return out, [p.grad.clone() for p in enc.parameters()]

    (out_c, grads_c), (out_r, grads_r) = run(True), run(False)
    torch.testing.assert_close(out_c.loss, out_r.loss.detach(), atol=1e-6, rtol=0)
    assert out_c.parts[name].item() > 1e-4  # the teacher term is there
    for a, b in zip(grads_c, grads_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_teacher_loss_nested_inside_another_wrapper_is_refused_in_one_line():
    from embedkit.training.module import check_teacher_nesting

    cfg = compose(["recipe=demo", "loss=matryoshka", "loss.inner=distill", "loss.dims=[4,8]"])
    loss = registry.build("loss", cfg["loss"], embedding_dim=D)
    with pytest.raises(ConfigError) as info:
        check_teacher_nesting(loss, "matryoshka")
    assert str(info.value).startswith("loss: matryoshka wraps a teacher loss") and "\n" not in str(info.value)
    check_teacher_nesting(registry.build("loss", compose(["recipe=demo", "loss=distill", "loss.inner=matryoshka",
                                                          "loss.inner.dims=[4,8]"])["loss"], embedding_dim=D), "distill")


def test_soft_labels_score_token_sets_by_the_losses_maxsim():
    """model.pooling=multi_vector: the student's own-candidate scores are the core's MaxSim of the same pairs."""
    from embedkit.losses.base import candidates
    from embedkit.losses.similarity import similarity_for
    from embedkit.losses.soft_labels import own_columns, student_own

    g = torch.Generator().manual_seed(10)
    q, p = (F.normalize(torch.randn(B, 3, D, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    n = F.normalize(torch.randn(B, K, 3, D, generator=g, dtype=torch.float64), dim=-1)
    full = similarity_for(q, "mean")(q, candidates(p, n))  # [B, B + B*K]
    own = slice(1, 3)
    expected = full[own].gather(1, own_columns(B, K, own))
    assert torch.allclose(student_own(q, p, n, own), expected, atol=1e-12)
    assert torch.allclose(student_own(q[:, 0], p[:, 0], n[:, :, 0], own),
                          (q[own, 0] @ candidates(p[:, 0], n[:, :, 0]).T).gather(1, own_columns(B, K, own)), atol=1e-12)
