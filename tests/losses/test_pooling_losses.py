"""Last-token pooling under left/right padding, a model-level padding check, InfoNCE by hand."""

import math
import random

import pytest
import torch

from embedkit.config import registry
from embedkit.data import demo
from embedkit.data.schema import Item
from embedkit.losses.infonce import InfoNCE
from embedkit.pooling.last_token import LastTokenPooling


def test_last_token_left_and_right_padding():
    hidden = torch.randn(3, 5, 4)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    pool = LastTokenPooling()
    assert torch.equal(pool(hidden, right), hidden[[0, 1, 2], [2, 4, 0]])
    assert torch.equal(pool(hidden, left), hidden[[0, 1, 2], [4, 4, 4]])


@pytest.fixture(scope="module")
def tiny_qwen():
    return registry.build("backbone", {"name": "qwen2_vl", "tiny": True, "max_pixels": 56 * 56 * 4}, seed=0)


def test_qwen2_vl_embedding_does_not_depend_on_the_batch(tiny_qwen):
    rng = random.Random(0)
    img = demo.draw_scene(("red", "circle", "in the centre"), rng, 56)
    big = demo.draw_scene(("blue", "cross", "at the top left"), rng, 112)  # more image tokens
    items = [Item(text="a red circle"), Item(image=img), Item(text="<|image_1|> a blue cross", image=big),
             Item(text="a much longer caption of a green square at the bottom right of it")]
    proc, pool = tiny_qwen.make_processor(), LastTokenPooling()
    with torch.no_grad():
        out = tiny_qwen(proc(items))
        together = pool(out.hidden, out.mask)
        for i, item in enumerate(items):
            alone = tiny_qwen(proc([item]))
            torch.testing.assert_close(pool(alone.hidden, alone.mask)[0], together[i], atol=1e-5, rtol=0)


def test_same_seed_same_weights():
    a = registry.build("backbone", {"name": "qwen2_vl", "tiny": True}, seed=3)
    b = registry.build("backbone", {"name": "qwen2_vl", "tiny": True}, seed=3)
    c = registry.build("backbone", {"name": "qwen2_vl", "tiny": True}, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_infonce_against_hand_computation():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(3, 2, 4, dtype=torch.float64), dim=-1)
    tau = 0.05
    cands = [p[j] for j in range(3)] + [n[j, k] for j in range(3) for k in range(2)]
    expected = 0.0
    for i in range(3):
        logits = [float(q[i] @ c) / tau for c in cands]
        expected += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    expected /= 3
    assert InfoNCE(temperature=tau)(q, p, n).loss.item() == pytest.approx(expected, abs=1e-6)
    without = sum(-(float(q[i] @ p[i]) / tau - math.log(sum(math.exp(float(q[i] @ p[j]) / tau) for j in range(3))))
                  for i in range(3)) / 3
    assert InfoNCE(temperature=tau)(q, p).loss.item() == pytest.approx(without, abs=1e-6)


def test_learnable_temperature_gets_a_gradient():
    loss = InfoNCE(temperature=0.02, learnable_temperature=True)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    loss(q, q.roll(1, 0)).loss.backward()
    assert loss.temperature.log_scale.grad is not None and loss.temperature().item() == pytest.approx(0.02, rel=1e-5)
