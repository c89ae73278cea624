"""Each loss against a reference written directly from its paper's formula, with explicit sums."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from embedkit.config import registry, schema
from embedkit.config.loader import compose
from embedkit.errors import ConfigError
from embedkit.losses.hardness_weighted import HardnessWeighted
from embedkit.losses.infonce import InfoNCE
from embedkit.losses.matryoshka import Matryoshka

B, K, D = 5, 3, 16


def batch(k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    return unit(B, D), unit(B, D), (unit(B, k, D) if k else None)


def cand_list(p, n):
    """Candidates of every query as a Python list: all positives, then each example's negatives."""
    out = [p[j] for j in range(p.shape[0])]
    if n is not None:
        out += [n[j, m] for j in range(n.shape[0]) for m in range(n.shape[1])]
    return out


def ref_direction(anchors, cands, tau, alpha=0.0, detach_weight=True):
    """-1/B Σ_i log( e^{s_ii/τ} / (e^{s_ii/τ} + Σ_{c≠i} w_ic e^{s_ic/τ}) ), w_ic = e^{α s_ic} (LLaVE eq.)."""
    total = 0.0
    for i in range(anchors.shape[0]):
        pos = torch.exp(torch.dot(anchors[i], cands[i]) / tau)
        denom = pos
        for c, cand in enumerate(cands):
            if c == i:
                continue
            s = torch.dot(anchors[i], cand)
            w = torch.exp(alpha * (s.detach() if detach_weight else s))
            denom = denom + w * torch.exp(s / tau)
        total = total - torch.log(pos / denom)
    return total / anchors.shape[0]


def ref_loss(q, p, n, tau, alpha=0.0, bidirectional=False):
    q2c = ref_direction(q, cand_list(p, n), tau, alpha)
    if not bidirectional:
        return q2c
    c2q = ref_direction(p, [q[j] for j in range(q.shape[0])], tau, alpha)
    return (q2c + c2q) / 2


@pytest.mark.parametrize("k", [0, K])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("learnable", [False, True])
def test_infonce_matches_formula(k, bidirectional, learnable):
    q, p, n = batch(k)
    loss = InfoNCE(temperature=0.05, learnable_temperature=learnable, bidirectional=bidirectional).double()
    out = loss(q, p, n)
    assert abs(out.loss.item() - ref_loss(q, p, n, 0.05, bidirectional=bidirectional).item()) < 1e-6
    assert set(out.parts) >= ({"q2c", "c2q"} if bidirectional else {"q2c"})
    params = [x for x in loss.parameters()]
    assert len(params) == (1 if learnable else 0)
    if learnable:
        out.loss.backward()
        assert params[0].grad is not None and params[0].grad.abs().item() > 0


@pytest.mark.parametrize("k", [0, K])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_hardness_weighted_matches_formula_and_gradient(k, bidirectional):
    q, p, n = batch(k, seed=1)
    q.requires_grad_(True)
    tau, alpha = 0.05, 3.0
    out = HardnessWeighted(alpha=alpha, temperature=tau, bidirectional=bidirectional).double()(q, p, n)
    ref = ref_loss(q, p, n, tau, alpha, bidirectional)
    assert abs(out.loss.item() - ref.item()) < 1e-6
    # the weight is a constant: gradients agree with the reference whose w is detached
    (g_out,) = torch.autograd.grad(out.loss, q)
    (g_ref,) = torch.autograd.grad(ref, q)
    assert torch.allclose(g_out, g_ref, atol=1e-6)
    # ... and differ from one that lets gradient flow through w (the test can fail)
    q2 = q.detach().clone().requires_grad_(True)
    undetached = ref_direction(q2, cand_list(p, n), tau, alpha, detach_weight=False)
    (g_und,) = torch.autograd.grad(undetached, q2)
    (g_q2c,) = torch.autograd.grad(ref_direction(q, cand_list(p, n), tau, alpha), q)
    assert not torch.allclose(g_und, g_q2c, atol=1e-4)


def test_hardness_weighted_alpha_zero_is_infonce_and_bidirectional_default():
    q, p, n = batch(K, seed=2)
    hw = HardnessWeighted(alpha=0.0, temperature=0.1).double()
    assert hw.bidirectional
    info = InfoNCE(temperature=0.1, bidirectional=True).double()
    assert abs(hw(q, p, n).loss.item() - info(q, p, n).loss.item()) < 1e-9


@pytest.mark.parametrize("k", [0, K])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("rows", [None, slice(0, 2), slice(2, B)])
def test_infonce_is_hardness_weighted_at_alpha_zero(k, bidirectional, rows):
    """One core: InfoNCE == hardness_weighted(α=0) in loss, parts and gradient, for every row set."""
    q, p, n = batch(k, seed=6)
    q.requires_grad_(True)
    info = InfoNCE(temperature=0.05, bidirectional=bidirectional).double()(q, p, n, rows=rows)
    hw = HardnessWeighted(alpha=0.0, temperature=0.05, bidirectional=bidirectional).double()(q, p, n, rows=rows)
    assert set(info.parts) == set(hw.parts) == {"q2c", "temperature"} | ({"c2q"} if bidirectional else set())
    for name in info.parts:
        assert abs(info.parts[name].item() - hw.parts[name].item()) <= 1e-6, name
    assert abs(info.loss.item() - hw.loss.item()) <= 1e-6
    (g_info,) = torch.autograd.grad(info.loss, q)
    (g_hw,) = torch.autograd.grad(hw.loss, q)
    assert torch.allclose(g_info, g_hw, atol=1e-6)
    # ... and α > 0 really changes it (so the equality above is not vacuous)
    weighted = HardnessWeighted(alpha=3.0, temperature=0.05, bidirectional=bidirectional).double()(q, p, n, rows=rows)
    assert abs(weighted.loss.item() - info.loss.item()) > 1e-6


def test_contrastive_core_targets_are_global_indices_under_rows():
    """rows=slice(a, b): row i's target is candidate i of the whole batch (the reference, sliced)."""
    from embedkit.losses.base import contrastive_loss

    q, p, n = batch(K, seed=7)
    tau = torch.tensor(0.05, dtype=torch.float64)
    out = contrastive_loss(q, p, n, temperature=tau, rows=slice(1, 4), alpha=2.0, bidirectional=True)
    first = lambda xs, i: xs[i:] + xs[:i]  # noqa: E731  (one anchor: its target, candidate i, first)
    cands, queries = cand_list(p, n), [q[j] for j in range(B)]
    q2c = sum(ref_direction(q[i : i + 1], first(cands, i), 0.05, 2.0) for i in range(1, 4)) / 3
    c2q = sum(ref_direction(p[i : i + 1], first(queries, i), 0.05, 2.0) for i in range(1, 4)) / 3
    assert abs(out.parts["q2c"].item() - q2c.item()) < 1e-9
    assert abs(out.parts["c2q"].item() - c2q.item()) < 1e-9
    assert abs(out.loss.item() - (q2c + c2q).item() / 2) < 1e-9


@pytest.mark.parametrize("k", [0, K])
@pytest.mark.parametrize("inner_name", ["infonce", "hardness_weighted"])
def test_matryoshka_matches_formula(k, inner_name):
    q, p, n = batch(k, seed=3)
    dims, weights = [4, 8, 16], [0.5, 1.0, 2.0]
    inner = InfoNCE(temperature=0.05) if inner_name == "infonce" else HardnessWeighted(alpha=2.0, temperature=0.05)
    out = Matryoshka(inner.double(), dims=dims, weights=weights, embedding_dim=D)(q, p, n)
    expected = 0.0
    for d, w in zip(dims, weights):
        cut = [None if x is None else x[..., :d] / x[..., :d].norm(dim=-1, keepdim=True) for x in (q, p, n)]
        if inner_name == "infonce":
            expected += w * ref_loss(*cut, 0.05)
        else:
            expected += w * ref_loss(*cut, 0.05, alpha=2.0, bidirectional=True)
    assert abs(out.loss.item() - float(expected)) < 1e-6
    assert set(out.parts) == {"dim_4", "dim_8", "dim_16"}


@pytest.mark.parametrize("name", ["infonce", "hardness_weighted", "matryoshka"])
def test_local_rows_average_to_the_full_batch(name):
    """The cross-device form: the mean over ranks of each rank's rows equals the whole-batch loss."""
    q, p, n = (torch.cat([a, b]) for a, b in zip(batch(K, seed=4), batch(K, seed=5)))  # 2B rows
    loss = registry.build("loss", schema._component("loss", {"name": name}, "infonce", "loss"), embedding_dim=D).double()
    full = loss(q, p, n).loss
    halves = [loss(q, p, n, rows=slice(0, B)).loss, loss(q, p, n, rows=slice(B, 2 * B)).loss]
    assert abs(full.item() - sum(h.item() for h in halves) / 2) < 1e-9
    assert abs(halves[0].item() - halves[1].item()) > 1e-6  # the rows really differ


def test_matryoshka_rejects_dims_larger_than_the_embedding_at_build_time():
    block = schema._component("loss", {"name": "matryoshka", "dims": [8, 64]}, "infonce", "loss")
    with pytest.raises(ConfigError, match=r"^loss\.dims: 64 is larger than the embedding \(32"):
        registry.build("loss", block, embedding_dim=32)
    built = registry.build("loss", {**block, "dims": [8, 32]}, embedding_dim=32)
    assert built.dims == [8, 32]
    assert registry.build("loss", {**block, "dims": None}, embedding_dim=32).dims == [4, 8, 16, 32]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["loss=matryoshka", "loss.dims=[]"], "loss.dims"),
        (["loss=matryoshka", "loss.dims=[8,16]", "loss.weights=[1.0]"], "loss.weights"),
        (["loss=matryoshka", "loss.weights=[1.0]"], "loss.weights"),
        (["loss=matryoshka", "loss.dims=[8,8]"], "loss.dims"),
        (["loss=matryoshka", "loss.dims=[0,8]"], "loss.dims"),
        (["loss=matryoshka", "loss.inner=hardness_weighted", "loss.inner.alpha=-1"], "loss.inner.alpha"),
        (["loss=hardness_weighted", "loss.alpha=-0.5"], "loss.alpha"),
        (["loss=infonce", "loss.temperature=0"], "loss.temperature"),
        (["loss=matryoshka", "loss.bogus=1"], "loss.bogus"),
    ],
)
def test_bad_loss_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        compose(["recipe=demo", *overrides])
    message = str(info.value)
    assert message.startswith(key + ":") and "\n" not in message


def test_good_matryoshka_config_validates_and_builds():
    cfg = compose(["loss=matryoshka", "loss.inner=hardness_weighted", "loss.dims=[8,16]", "loss.weights=[1,2]"])
    assert cfg["loss"]["inner"]["name"] == "hardness_weighted" and cfg["loss"]["inner"]["alpha"] >= 0
    loss = registry.build("loss", cfg["loss"], embedding_dim=D)
    assert isinstance(loss.inner, HardnessWeighted) and loss.weights == [1.0, 2.0]
    q, p, n = (x.float() for x in batch(K, seed=5))
    assert math.isfinite(loss(q, p, n).loss.item())
