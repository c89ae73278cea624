"""2D Matryoshka / Starbucks (``loss=matryoshka_2d``): the formula against a direct implementation,
the seeded per-step draw of ``mode=sample``, per-layer embeddings from the encoder, and GradCache
(chunks) == one graph on the tiny demo model with dropout on."""

import math

import pytest
import torch

from embedkit.config import registry
from embedkit.data.schema import Item
from embedkit.errors import ConfigError, UserError
from embedkit.losses.infonce import InfoNCE
from embedkit.losses.matryoshka_2d import Matryoshka2D
from tests.helpers.variant_batches import assert_cached_equals_one_graph, module_and_batches

B, K, L, D = 5, 2, 3, 16
TAU = 0.05


def direct_infonce(q, p, n):
    """-1/B Σ_i log softmax_i over [all p, all n] of q_i · c / τ, by loops."""
    cands = [p[j] for j in range(len(p))] + [n[j, k] for j in range(len(n)) for k in range(n.shape[1])]
    total = 0.0
    for i in range(len(q)):
        logits = [float(q[i] @ c) / TAU for c in cands]
        top = max(logits)
        total -= logits[i] - (top + math.log(sum(math.exp(x - top) for x in logits)))
    return total / len(q)


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def sub(x, layer, dim):
    return unit(x[..., layer - 1, :dim])


@pytest.fixture
def embeddings():
    g = torch.Generator().manual_seed(0)
    q, p = (unit(torch.randn(B, L, D, generator=g, dtype=torch.float64)) for _ in range(2))
    return q, p, unit(torch.randn(B, K, L, D, generator=g, dtype=torch.float64))


def test_fixed_pairs_sum_the_weighted_inner_losses(embeddings):
    q, p, n = embeddings
    pairs, weights = [[1, 4], [2, 8], [3, 16]], [0.5, 1.0, 2.0]
    loss = Matryoshka2D(InfoNCE(TAU), pairs=pairs, weights=weights, embedding_dim=D, num_layers=L, seed=0)
    out = loss(q, p, n)
    expected = sum(w * direct_infonce(sub(q, l, d), sub(p, l, d), sub(n, l, d)) for (l, d), w in zip(pairs, weights))
    assert abs(out.loss.item() - expected) <= 1e-6
    assert abs(out.parts["l2_d8"].item() - direct_infonce(sub(q, 2, 8), sub(p, 2, 8), sub(n, 2, 8))) <= 1e-6


def test_sample_mode_is_full_plus_one_seeded_draw(embeddings):
    q, p, n = embeddings
    a = Matryoshka2D(InfoNCE(TAU), mode="sample", embedding_dim=D, num_layers=L, seed=3)
    b = Matryoshka2D(InfoNCE(TAU), mode="sample", embedding_dim=D, num_layers=L, seed=3)
    draws = []
    for _ in range(12):
        out = a(q, p, n)
        layer, dim = int(out.parts["sampled_layer"]), int(out.parts["sampled_dim"])
        assert (layer, dim) != (L, D) and (layer, dim) in a.pairs
        expected = direct_infonce(sub(q, L, D), sub(p, L, D), sub(n, L, D)) + direct_infonce(
            sub(q, layer, dim), sub(p, layer, dim), sub(n, layer, dim))
        assert abs(out.loss.item() - expected) <= 1e-6
        other = b(q, p, n)
        assert (int(other.parts["sampled_layer"]), int(other.parts["sampled_dim"])) == (layer, dim)
        draws.append((layer, dim))
    assert len(set(draws)) > 2  # it does draw
    # the counter is state: it travels with a checkpoint, so a resumed run continues the sequence
    c = Matryoshka2D(InfoNCE(TAU), mode="sample", embedding_dim=D, num_layers=L, seed=3)
    c.load_state_dict(a.state_dict())
    assert int(c(q, p, n).parts["sampled_layer"]) == int(a(q, p, n).parts["sampled_layer"])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="loss.pairs"):
        registry.build("loss", {"name": "matryoshka_2d", "pairs": [[9, 8]]}, embedding_dim=D, num_layers=L, seed=0)
    with pytest.raises(ConfigError, match="loss.pairs"):
        registry.build("loss", {"name": "matryoshka_2d", "pairs": [[1, 99]]}, embedding_dim=D, num_layers=L, seed=0)


def test_encoder_layers_end_with_the_full_model_and_cut_depth():
    module, batch = module_and_batches("loss=matryoshka_2d")
    encoder = module.encoder.eval()
    chunk = batch.query_chunks[0]
    with torch.no_grad():
        per_layer = encoder(chunk, layers=True)
        assert per_layer.shape == (2, encoder.backbone.num_layers, encoder.embedding_dim)
        torch.testing.assert_close(per_layer[:, -1], encoder(chunk), atol=1e-6, rtol=0)
        torch.testing.assert_close(encoder.layer_embeddings(chunk, depth=1), per_layer[:, 0], atol=1e-6, rtol=0)
        assert not torch.allclose(per_layer[:, 0], per_layer[:, -1], atol=1e-3)


@pytest.mark.parametrize("mode", ["pairs", "sample"])
def test_gradcache_equals_one_graph(mode):
    module, batch = module_and_batches("loss=matryoshka_2d", f"loss.mode={mode}")
    out = assert_cached_equals_one_graph(module, batch)
    assert out.parts["masked_negatives"] > 0  # the false-negative mask reached the inner loss


def test_encode_layer_cuts_the_model_to_that_depth():
    module, _ = module_and_batches("loss=matryoshka_2d")
    encoder = module.encoder.eval()
    texts = ["a red circle", "a blue square on the left"]
    full = encoder.encode(texts)
    per_layer = encoder.encode_items([Item(text=t) for t in texts])
    torch.testing.assert_close(encoder.encode(texts, layer=2), full, atol=0, rtol=0)
    torch.testing.assert_close(per_layer, full, atol=0, rtol=0)
    first = encoder.encode(texts, layer=1, dim=8)
    assert first.shape == (2, 8) and not torch.allclose(first, full[:, :8], atol=1e-3)
    process = encoder.processor()
    with torch.no_grad():
        expected = encoder(process([Item(text=t) for t in texts]), layers=True)
    torch.testing.assert_close(first, unit(expected[:, 0, :8]), atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="layer: must be between 1 and 2"):
        encoder.encode(texts, layer=3)
