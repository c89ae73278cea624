"""Chunking by token budget: contiguous chunks within the budget, exact lengths, same gradients."""

import random

import pytest
import torch

from embedkit.config.loader import compose
from embedkit.data.batch import ChunkCollate, chunked_by_tokens
from embedkit.data.demo import draw_scene, single_combinations
from embedkit.data.schema import Example, Item
from embedkit.training.module import EmbeddingModule
from tests.helpers.cli import SMALL_DEMO


def test_chunks_keep_order_and_respect_size_and_budget():
    rng = random.Random(0)
    lengths = [rng.choice([5, 20, 80, 300]) for _ in range(200)]
    items = list(range(200))
    chunks = chunked_by_tokens(items, lengths, size=8, budget=400)
    assert [i for c in chunks for i in c] == items
    for c in chunks:
        longest = max(lengths[i] for i in c)
        assert len(c) <= 8
        assert len(c) * longest <= 400 or len(c) == 1
    # greedy: a chunk closes only when its next item would break a limit
    for a, b in zip(chunks, chunks[1:]):
        grown = max(lengths[i] for i in a + b[:1])
        assert len(a) == 8 or (len(a) + 1) * grown > 400


def test_an_item_over_the_budget_gets_a_chunk_of_its_own():
    assert chunked_by_tokens(list("abcd"), [10, 500, 10, 10], size=4, budget=100) == [["a"], ["b"], ["c", "d"]]
    assert chunked_by_tokens([], [], size=4, budget=100) == []


@pytest.fixture(scope="module")
def module():
    cfg = compose(["recipe=demo", *SMALL_DEMO, "model.backbone.min_pixels=3136",
                   "model.backbone.max_pixels=50176"])  # 56..224 px: images of uneven cost
    return EmbeddingModule.from_config(cfg).eval()


def _uneven_examples(n: int) -> list[Example]:
    rng = random.Random(1)
    out = []
    for _ in range(n):
        combo = rng.choice(single_combinations())
        size = rng.choice([56, 112, 224])
        out.append(Example(query=Item(text="a " * rng.randint(1, 12) + "scene"),
                           positive=Item(image=draw_scene(combo, rng, size)), task="t"))
    return out


def test_qwen2_vl_num_tokens_matches_processing(module):
    processor = module.encoder.processor()
    items = [ex.positive for ex in _uneven_examples(6)] + [ex.query for ex in _uneven_examples(3)]
    items.append(Item(text="left <|image_1|> right", image=items[0].image))
    lengths = [processor.num_tokens(it) for it in items]
    exact = [int(processor([it])["input_ids"].shape[1]) for it in items]
    assert lengths == exact
    assert len(set(lengths)) > 3  # the images really differ in cost


@pytest.mark.parametrize("sort", [False, True])
def test_token_chunks_give_the_gradients_of_one_pass_per_side(module, sort):
    examples = _uneven_examples(8)
    processor = module.encoder.processor()
    budget = 3 * max(processor.num_tokens(ex.positive) for ex in examples)
    by_tokens = ChunkCollate(processor, 8, 0, chunk_tokens=budget, sort=sort)(examples)
    assert (by_tokens.candidate_restore is not None) == sort
    assert len(by_tokens.candidate_chunks) > 2  # the budget split the images
    for chunk in by_tokens.candidate_chunks:
        assert chunk["input_ids"].numel() <= budget or chunk["input_ids"].shape[0] == 1

    def grads(batch):
        out = module.backward_batch(batch, lambda t: t.backward())
        g = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        module.zero_grad(set_to_none=True)
        return out.loss, g

    ref_loss, ref = grads(ChunkCollate(processor, 8, 0)(examples))
    loss, got = grads(by_tokens)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)


def test_fsdp2_takes_a_token_budget():
    # ranks pad to the same number of forward passes (tests/e2e/test_gradcache_distributed.py)
    cfg = compose(["recipe=demo", "trainer.strategy=fsdp2", "trainer.devices=2", "train.chunk_tokens=4096"])
    assert cfg["train"]["chunk_tokens"] == 4096 and cfg["train"]["sort_chunks"] is True
