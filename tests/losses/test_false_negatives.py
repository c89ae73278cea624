"""In-batch false-negative masking: each loss equals its formula with the masked columns removed.

A batch with planted copies (a positive repeated as another example's positive and as a hard
negative) is masked by content key; the reference is the paper formula written with explicit sums
over the candidates that remain. Single device here, GradCache here, 2-process DDP in
tests/helpers/scripts/ddp_loss_grad.py (tests/e2e/test_distributed.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from embedkit.config import registry, schema
from embedkit.data.schema import Example, Item, content_key
from embedkit.losses.base import CandidateMask, LossOutput, call_loss, candidates
from tests.losses.test_losses import ref_loss

B, K, D = 6, 2, 16


def planted(seed: int = 0):
    """q, p, n (unit, float64) and candidate keys: p3 copies p1, n[0,1] copies p2, n[4,0] copies p4."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    q, p, n = unit(B, D), unit(B, D), unit(B, K, D)
    p[3] = p[1]
    n[0, 1] = p[2]
    n[4, 0] = p[4]  # a copy of the query's OWN positive among its hard negatives
    keys = list(range(B)) + [100 + i for i in range(B * K)]
    keys[3] = keys[1]
    keys[B + 0 * K + 1] = keys[2]
    keys[B + 4 * K + 0] = keys[4]
    return q, p, n, torch.tensor(keys, dtype=torch.int64)


def ref_direction_masked(anchors, cands, col_keys, tau, alpha=0.0, margin=None):
    """-1/B Σ_i log( e^{s_ii/τ} / (e^{s_ii/τ} + Σ_{c kept} w_ic e^{s_ic/τ}) ), c kept: c != i, key_c != key_i,
    and (with a margin) s_ic <= s_ii - margin."""
    total = 0.0
    for i in range(anchors.shape[0]):
        s_pos = torch.dot(anchors[i], cands[i])
        denom = torch.exp(s_pos / tau)
        for c, cand in enumerate(cands):
            s = torch.dot(anchors[i], cand)
            if c == i or col_keys[c] == col_keys[i] or (margin is not None and s.item() > s_pos.item() - margin):
                continue
            denom = denom + torch.exp(alpha * s.detach()) * torch.exp(s / tau)
        total = total - torch.log(torch.exp(s_pos / tau) / denom)
    return total / anchors.shape[0]


def ref_masked(q, p, n, keys, tau, alpha=0.0, bidirectional=False, margin=None):
    cands = [p[j] for j in range(B)] + [n[j, m] for j in range(B) for m in range(K)]
    q2c = ref_direction_masked(q, cands, keys.tolist(), tau, alpha, margin)
    if not bidirectional:
        return q2c
    c2q = ref_direction_masked(p, [q[j] for j in range(B)], keys[:B].tolist(), tau, alpha, margin)
    return (q2c + c2q) / 2


def build(block):
    return registry.build("loss", schema._component("loss", block, "infonce", "loss"), embedding_dim=D)


CASES = {
    "infonce": ({"name": "infonce", "temperature": 0.05}, 0.0, False),
    "infonce_bidirectional": ({"name": "infonce", "temperature": 0.05, "bidirectional": True}, 0.0, True),
    "hardness_weighted": ({"name": "hardness_weighted", "alpha": 4.0, "temperature": 0.05}, 4.0, True),
    "hardness_weighted_one_way": ({"name": "hardness_weighted", "alpha": 2.0, "temperature": 0.1,
                                   "bidirectional": False}, 2.0, False),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("margin", [None, 0.3])
def test_each_loss_equals_its_formula_with_the_masked_columns_removed(name, margin):
    block, alpha, bidir = CASES[name]
    q, p, n, keys = planted()
    loss = build(block)
    tau = block["temperature"]
    out = loss(q, p, n, mask=CandidateMask(keys, margin))
    ref = ref_masked(q, p, n, keys, tau, alpha, bidir, margin)
    assert abs(out.loss.item() - ref.item()) <= 1e-6
    unmasked = ref_loss(q, p, n, tau, alpha, bidir)
    assert abs(out.loss.item() - unmasked.item()) > 1e-3  # the planted copies matter: the test can fail
    # q2c drops: p1<->p3 both ways (2), n[0,1] for q2 (1), n[4,0] for q4 (1); the margin adds more
    dropped = out.parts["masked_negatives"].item()
    assert dropped == 4 if margin is None else dropped > 4


def test_margin_alone_and_gradient_match_the_formula():
    q, p, n, keys = planted(seed=3)
    q.requires_grad_(True)
    loss = build(CASES["hardness_weighted"][0])
    out = loss(q, p, n, mask=CandidateMask(None, -0.1))  # UniME: drop negatives above positive + 0.1
    (gq,) = torch.autograd.grad(out.loss, q)
    q2 = q.detach().clone().requires_grad_(True)
    ref = ref_masked(q2, p, n, torch.arange(B + B * K), 0.05, 4.0, True, -0.1)
    (gr,) = torch.autograd.grad(ref, q2)
    assert abs(out.loss.item() - ref.item()) <= 1e-6
    torch.testing.assert_close(gq, gr, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("inner", ["infonce", "hardness_weighted"])
def test_matryoshka_inner_loss_is_masked_at_every_dim(inner):
    q, p, n, keys = planted(seed=1)
    block = {"name": "matryoshka", "inner": {"name": inner, "temperature": 0.05}, "dims": [4, 8, 16]}
    out = build(block)(q, p, n, mask=CandidateMask(keys))
    inner_cfg = build(block).inner
    alpha = getattr(inner_cfg, "alpha", 0.0)
    bidir = inner_cfg.bidirectional
    ref = sum(ref_masked(*(F.normalize(x[..., :d], dim=-1) for x in (q, p, n)), keys, 0.05, alpha, bidir)
              for d in (4, 8, 16))
    assert abs(out.loss.item() - ref.item()) <= 1e-6
    assert out.parts["masked_negatives"].item() == 4


def test_local_rows_of_a_masked_loss_average_to_the_full_batch():
    q, p, n, keys = planted(seed=2)
    loss = build(CASES["hardness_weighted"][0])
    mask = CandidateMask(keys)
    full = loss(q, p, n, mask=mask)
    halves = [loss(q, p, n, rows=r, mask=mask) for r in (slice(0, 3), slice(3, 6))]
    assert abs(full.loss.item() - sum(h.loss.item() for h in halves) / 2) <= 1e-9
    assert sum(h.parts["masked_negatives"].item() for h in halves) == full.parts["masked_negatives"].item()


def test_user_losses_without_mask_keep_working_and_kwargs_losses_get_it():
    q, p, n, keys = planted()
    seen = {}

    def plain(q, p, n=None):  # the original contract
        return LossOutput(F.cross_entropy(q @ candidates(p, n).T, torch.arange(q.shape[0])))

    def kw(q, p, n=None, **kwargs):
        seen.update(kwargs)
        return plain(q, p, n)

    mask = CandidateMask(keys)
    assert torch.equal(call_loss(plain, q, p, n, mask=mask).loss, plain(q, p, n).loss)
    call_loss(kw, q, p, n, rows=slice(0, 3), mask=mask)
    assert seen["mask"] is mask and seen["rows"] == slice(0, 3)


def test_gradcache_with_masking_equals_one_graph():
    """The cache step sees the same mask: chunked gradients == one graph, both masked."""
    from tests.training.test_gradcache import Encoder, one_step

    keys = torch.tensor([0, 1, 2, 1, 4, 5, 6, 7] + [2, 9, 10, 4, 12, 13, 14, 15], dtype=torch.int64)

    def run(cached, masked):
        torch.manual_seed(0)
        enc, loss = Encoder(), build({"name": "hardness_weighted", "alpha": 3.0, "temperature": 0.1})
        x = torch.randn(8, 6)
        pos = x.flip(0) + 0.1
        pos[3] = pos[1]  # planted copies, as the keys say
        neg = x.roll(3, 0) - 0.2
        neg[0], neg[3] = pos[2], pos[4]
        chunks = list(x.split(3)) + list(pos.split(3)) + list(neg.split(3))

        def loss_of(e):
            c = torch.cat(e[3:])
            return loss(torch.cat(e[:3]), c[:8], c[8:].view(8, 1, -1), mask=CandidateMask(keys) if masked else None)

        out = one_step(enc, chunks, loss_of, cached)
        return out.loss.detach(), [p.grad for p in enc.parameters()]

    (loss_c, grads_c), (loss_r, grads_r) = run(True, True), run(False, True)
    torch.testing.assert_close(loss_c, loss_r, atol=1e-6, rtol=0)
    for a, b in zip(grads_c, grads_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    loss_u, _ = run(False, False)
    assert abs(loss_u.item() - loss_r.item()) > 1e-3


def test_content_keys_compare_content_not_identity():
    red = Image.new("RGB", (8, 8), (200, 0, 0))
    assert content_key(Item("a", red)) == content_key(Item("a", red.copy()))  # another object, same pixels
    assert content_key(Item("a", red)) != content_key(Item("a", Image.new("RGB", (8, 8), (201, 0, 0))))
    assert content_key(Item("a", red)) != content_key(Item("b", red))
    assert content_key(Item("a")) != content_key(Item("a", red))


def test_the_collate_carries_candidate_keys_in_candidate_order():
    from embedkit.data.batch import ChunkCollate

    examples = [Example(Item(f"q{i}"), Item(t), [Item(f"n{i}")]) for i, t in enumerate(["cat", "dog", "cat"])]
    batch = ChunkCollate(lambda items: {"n": len(items)}, 2, 1)(examples)
    keys = batch.candidate_keys.tolist()
    assert len(keys) == 6 and keys[0] == keys[2] != keys[1]
    assert keys[3:] == [content_key(Item(f"n{i}")) for i in range(3)]


def test_the_module_masks_copies_in_a_real_batch_through_the_cache():
    """The real module (tiny Qwen2-VL, chunks of 2 through GradCache): a repeated positive is masked."""
    from embedkit.config.loader import compose
    from embedkit.data.batch import ChunkCollate
    from embedkit.data.demo import train_examples
    from embedkit.training.module import EmbeddingModule
    from tests.helpers.cli import SMALL_DEMO

    cfg = compose(["recipe=demo", *SMALL_DEMO])
    assert cfg["train"]["mask_duplicates"] is True  # on in the demo recipes
    module = EmbeddingModule.from_config(cfg).eval()
    examples = list(train_examples(cfg["data"]["demo"], 0, 6))
    examples[3].positive = Item(examples[1].positive.text, examples[1].positive.image.copy())  # same content
    batch = ChunkCollate(module.encoder.processor(), 2, 0)(examples)
    out = module.backward_batch(batch, lambda t: t.backward())
    assert out.parts["masked_negatives"].item() == 2  # q1 drops p3, q3 drops p1
    # cost-sorted chunks (train.sort_chunks): the keys stay in batch order, where the loss sees the
    # candidates once restored, so the same pairs are masked and the loss is the same
    examples[4].positive = Item("a much longer caption " * 6, examples[4].positive.image)  # reorders the pool
    batch = ChunkCollate(module.encoder.processor(), 2, 0)(examples)
    out = module.backward_batch(batch, lambda t: t.backward())
    ordered = ChunkCollate(module.encoder.processor(), 2, 0, sort=True)(examples)
    assert ordered.candidate_restore is not None
    assert not torch.equal(ordered.candidate_restore, torch.arange(len(ordered.candidate_restore)))
    again = module.backward_batch(ordered, lambda t: t.backward())
    assert again.parts["masked_negatives"].item() == 2 and abs(again.loss.item() - out.loss.item()) <= 1e-5
    module.mask_duplicates = False
    plain = module.backward_batch(batch, lambda t: t.backward())
    assert "masked_negatives" not in plain.parts and abs(plain.loss.item() - out.loss.item()) > 1e-4
