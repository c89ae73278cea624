"""A tiny demo module and one contrastive batch (B queries, B positives, one hard negative each) as a
chunked ``TrainBatch``, through ``EmbeddingModule.backward_batch`` with the cache (GradCache) and
with the same chunks encoded with grad in one graph. Shared by the 2D Matryoshka and multi-vector
GradCache tests; attention dropout on, so the replay is exercised."""

import types

import torch

from embedkit.config.loader import compose
from embedkit.data.batch import TrainBatch, chunked
from embedkit.data.demo import train_examples
from embedkit.data.schema import content_key
from embedkit.training import module as module_mod
from embedkit.training.module import EmbeddingModule
from tests.helpers.cli import SMALL_DEMO

B, CHUNK = 6, 2


def module_and_batches(*overrides):
    cfg = compose(["recipe=demo", *SMALL_DEMO, *overrides])
    module = EmbeddingModule.from_config(cfg).train()
    for m in module.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.2
    examples = list(train_examples(cfg["data"]["demo"], 0, B))
    queries = [ex.query for ex in examples]
    # each example's negative: the next example's positive (a copy of a positive: masking has work)
    cands = [ex.positive for ex in examples] + [examples[(i + 1) % B].positive for i in range(B)]
    keys = torch.tensor([content_key(c) for c in cands], dtype=torch.int64)
    process = module.encoder.processor()

    return module, TrainBatch([process(c) for c in chunked(queries, CHUNK)],
                              [process(c) for c in chunked(cands, CHUNK)], B, 1, ["t"] * B, keys)


def step(module, batch, seed=0, use_cache=True):
    """(loss, gradients) of one backward_batch (``use_cache=False``: one graph); the loss's draw
    counter rewound first, so both see the same (layer, dim) draw."""
    torch.manual_seed(seed)
    for buf_name, buf in module.loss_fn.named_buffers():
        if buf_name.endswith("draws"):
            buf.zero_()
    real = module_mod.gradcache
    if not use_cache:
        module_mod.gradcache = types.SimpleNamespace(
            cached_step=lambda *a, **k: real.cached_step(*a, **{**k, "use_cache": False}))
    try:
        out = module.backward_batch(batch, lambda t: t.backward())
    finally:
        module_mod.gradcache = real
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out, grads


def assert_cached_equals_one_graph(module, chunked_batch):
    out, grads = step(module, chunked_batch)
    ref, ref_grads = step(module, chunked_batch, use_cache=False)
    _, other = step(module, chunked_batch, seed=1)
    assert grads.keys() == ref_grads.keys() and len(grads) == sum(p.requires_grad for p in module.parameters())
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    assert any(not torch.allclose(other[n], ref_grads[n], atol=1e-5) for n in ref_grads)  # dropout really on
    return out
