"""The real EmbeddingModule (tiny Qwen2-VL, images + text) through GradCache, attention dropout on.

Chunks of 2 through the cache equal the same chunk layout encoded with grad in one graph: the loss
and every trainable gradient to 1e-5 (float32); under bf16 autocast the two agree to bf16 precision.
"""

import pytest
import torch

from embedkit.config.loader import compose
from embedkit.data.demo import train_examples
from embedkit.training.gradcache import cached_step
from embedkit.training.module import EmbeddingModule
from tests.helpers.cli import SMALL_DEMO

B, CHUNK = 8, 2


@pytest.fixture(scope="module")
def setup():
    cfg = compose(["recipe=demo", *SMALL_DEMO])
    module = EmbeddingModule.from_config(cfg).train()
    dropped = [m for m in module.modules() if hasattr(m, "attention_dropout")]
    assert dropped
    for m in dropped:  # the tiny model is built with attention dropout 0; switch it on
        m.attention_dropout = 0.2
    examples = list(train_examples(cfg["data"]["demo"], 0, B))
    processor = module.encoder.processor()
    q = [processor([ex.query for ex in examples[i : i + CHUNK]]) for i in range(0, B, CHUNK)]
    c = [processor([ex.positive for ex in examples[i : i + CHUNK]]) for i in range(0, B, CHUNK)]
    return module, q + c, len(q)


def _loss_of(module, nq):
    return lambda embs: module.compute_loss(torch.cat(embs[:nq]), torch.cat(embs[nq:]), None)


def _grads(module):
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def _cached(module, chunks, nq, seed=0):
    torch.manual_seed(seed)
    out = cached_step(module.encode, chunks, _loss_of(module, nq), lambda t: t.backward())
    return out.loss, _grads(module)


def _one_graph(module, chunks, nq, seed=0):
    torch.manual_seed(seed)
    out = _loss_of(module, nq)([module.encode(c) for c in chunks])
    out.loss.backward()
    return out.loss.detach(), _grads(module)


def test_real_module_chunked_equals_one_graph_with_dropout(setup):
    module, chunks, nq = setup
    loss, grads = _cached(module, chunks, nq)
    ref_loss, ref = _one_graph(module, chunks, nq)
    _, other = _cached(module, chunks, nq, seed=1)
    assert grads.keys() == ref.keys() and len(grads) == sum(p.requires_grad for p in module.parameters())
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    for n in ref:
        torch.testing.assert_close(grads[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)
    assert any(not torch.allclose(other[n], ref[n], atol=1e-5) for n in ref)  # dropout really on


def test_real_module_under_bf16_autocast(setup):
    module, chunks, nq = setup
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _cached(module, chunks, nq)
        ref_loss, ref = _one_graph(module, chunks, nq)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-2)
    num = sum((grads[n].float() - ref[n].float()).norm() ** 2 for n in ref) ** 0.5
    den = sum(ref[n].float().norm() ** 2 for n in ref) ** 0.5
    assert num / den < 2e-2, (num / den).item()


def test_backward_batch_skips_the_cache_when_each_side_fits_one_chunk(setup):
    """chunk_size >= batch: one forward per side with grad (no extra no-grad pass), same gradients."""
    from embedkit.data.batch import ChunkCollate

    module, _, _ = setup
    module.eval()  # no dropout: layouts are comparable
    examples = list(train_examples(module.hparams["config"]["data"]["demo"], 0, B))
    processor = module.encoder.processor()
    calls = []
    encode = module.encode

    def counting_encode(inputs):
        calls.append(torch.is_grad_enabled())
        return encode(inputs)

    results = {}
    try:
        module.encode = counting_encode
        for chunk in (B, CHUNK):
            calls.clear()
            out = module.backward_batch(ChunkCollate(processor, chunk, 0)(examples), lambda t: t.backward())
            results[chunk] = (out.loss, _grads(module), list(calls))
    finally:
        del module.encode
        module.train()
    assert results[B][2] == [True, True]  # queries, candidates: with grad, once each
    # the cache: 7 chunks under no_grad, the last with grad (graph kept), then 7 replays
    assert results[CHUNK][2] == [False] * 7 + [True] * 8
    torch.testing.assert_close(results[B][0], results[CHUNK][0], atol=1e-5, rtol=0)
    for n, g in results[B][1].items():
        torch.testing.assert_close(results[CHUNK][1][n], g, atol=1e-5, rtol=1e-4, msg=n)
