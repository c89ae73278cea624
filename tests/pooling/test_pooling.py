"""Pooling heads: padding invariance (left and right), the formulas, state_dict round trips."""

from __future__ import annotations

import io

import pytest
import torch

from embedkit.config import registry, schema
from embedkit.errors import ConfigError

H, L = 16, 3  # hidden size, layers (all_layers holds L + 1 tensors: embeddings + each layer)
HEADS = ["last_token", "mean", "latent_attention", "multi_layer"]


def build(name: str, **params):
    torch.manual_seed(0)
    block = schema._component("pooling", {"name": name, **params}, "last_token", "model.pooling")
    head = registry.build("pooling", block, hidden_size=H, num_layers=L)
    return head.double().eval()


def rows(lengths, seed=0):
    """Per row: its real tokens' hidden states for each of the L + 1 layers, [L+1, len, H]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(L + 1, n, H, generator=g, dtype=torch.float64) for n in lengths]


def pad(seqs, side: str, fill: float):
    """Batch the rows with padding on ``side``; padding holds ``fill`` (junk the head must ignore)."""
    T = max(s.shape[1] for s in seqs)
    layers = torch.full((L + 1, len(seqs), T, H), fill, dtype=torch.float64)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = s.shape[1]
        span = slice(T - n, T) if side == "left" else slice(0, n)
        layers[:, i, span] = s
        mask[i, span] = 1
    all_layers = tuple(layers[j] for j in range(L + 1))
    return all_layers[-1], mask, all_layers


def pool(head, hidden, mask, all_layers):
    return head(hidden, mask, all_layers if head.needs_all_layers else None)


@pytest.mark.parametrize("name", HEADS + ["latent_attention:residual=false", "multi_layer:token=mean"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(name, side):
    name, _, option = name.partition(":")
    params = {}
    if option:
        key, value = option.split("=")
        params[key] = {"false": False}.get(value, value)
    head = build(name, **params)
    seqs = rows([5, 2, 7, 1])
    batched = pool(head, *pad(seqs, side, fill=1e4))
    assert torch.isfinite(batched).all() and batched.shape == (4, H)
    for i, s in enumerate(seqs):
        alone = pool(head, *pad([s], side, fill=0.0))
        assert torch.allclose(batched[i], alone[0], atol=1e-8), (name, side, i)
    # left and right padding agree too
    other = pool(head, *pad(seqs, "right" if side == "left" else "left", fill=-3.0))
    assert torch.allclose(batched, other, atol=1e-8)
    # and the head does depend on the content (the test can fail)
    assert not torch.allclose(batched[0], batched[1], atol=1e-6)


def test_mean_is_the_masked_mean():
    head = build("mean")
    seqs = rows([4, 2], seed=3)
    out = pool(head, *pad(seqs, "left", fill=7.0))
    for i, s in enumerate(seqs):
        expected = sum(s[-1, t] for t in range(s.shape[1])) / s.shape[1]
        assert torch.allclose(out[i], expected, atol=1e-12)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_over_the_vision_span_per_row(side):
    """``span: vision`` (jina-v4): a row with a vision block is averaged over the block (start to end token,
    both included: ``_common.vision_span``), a row without over its real tokens; per row, either padding."""
    from embedkit.backbones._common import vision_span

    VS, VE = 5, 6
    head = build("mean", span="vision")
    assert head.needs_span and not build("mean").needs_span
    seqs = rows([6, 3], seed=4)
    hidden, mask, _ = pad(seqs, side, fill=9.0)
    ids = torch.full(mask.shape, 1)
    ids[mask == 0] = 0
    first = mask[0].nonzero()[0, 0].item()  # row 0's first real token: <text> VS x x VE <text> <text>
    ids[0, first + 1], ids[0, first + 3] = VS, VE
    out = head(hidden, mask, None, span=vision_span(ids, VS, VE))
    assert torch.allclose(out[0], seqs[0][-1, 1:4].mean(0), atol=1e-12)
    assert torch.allclose(out[1], seqs[1][-1].mean(0), atol=1e-12)
    with pytest.raises(ValueError, match="no vision span"):
        head(hidden, mask, None)


def test_last_token_picks_the_last_real_token():
    head = build("last_token")
    seqs = rows([4, 2], seed=4)
    for side in ("left", "right"):
        out = pool(head, *pad(seqs, side, fill=7.0))
        for i, s in enumerate(seqs):
            assert torch.equal(out[i], s[-1, -1])


@pytest.mark.parametrize("residual", [False, True])
def test_latent_attention_formula(residual):
    """NV-Embed: O = softmax(Q Kᵀ/√d) V with K = V = latents (per head), MLP, masked mean."""
    head = build("latent_attention", num_latents=6, num_heads=2, residual=residual)
    seqs = rows([3, 5], seed=5)
    out = pool(head, *pad(seqs, "right", fill=0.0))
    att = head.attention
    wq, wk, wv = att.in_proj_weight.chunk(3)
    bq, bk, bv = att.in_proj_bias.chunk(3)
    d = H // 2
    for i, s in enumerate(seqs):
        tokens = []
        for t in range(s.shape[1]):
            x = s[-1, t]
            q = wq @ x + bq
            heads = []
            for h in range(2):
                qs = q[h * d : (h + 1) * d]
                scores = torch.stack([qs @ (wk @ lat + bk)[h * d : (h + 1) * d] for lat in head.latents]) / d**0.5
                weights = torch.softmax(scores, dim=0)
                heads.append(sum(w * (wv @ lat + bv)[h * d : (h + 1) * d] for w, lat in zip(weights, head.latents)))
            o = att.out_proj(torch.cat(heads))
            if residual:
                a = x + o
                tokens.append(a + head.mlp(a))
            else:
                tokens.append(head.mlp(o))
        expected = sum(tokens) / len(tokens)
        assert torch.allclose(out[i], expected, atol=1e-10)


@pytest.mark.parametrize("token", ["last", "mean"])
def test_multi_layer_uses_every_layer(token):
    head = build("multi_layer", token=token)
    assert head.needs_all_layers
    hidden, mask, all_layers = pad(rows([4, 3], seed=6), "left", fill=0.0)
    base = head(hidden, mask, all_layers)
    for j in range(L + 1):  # changing any single layer changes the embedding
        changed = list(all_layers)
        changed[j] = changed[j] + torch.randn_like(changed[j])
        assert not torch.allclose(head(hidden, mask, tuple(changed)), base, atol=1e-6), j
    # the layers alone (no embedding output) are accepted too
    assert head(hidden, mask, all_layers[1:]).shape == (2, H)
    with pytest.raises(ValueError):
        head(hidden, mask, all_layers[2:])


@pytest.mark.parametrize("name", ["latent_attention", "multi_layer"])
def test_heads_with_params_round_trip_a_state_dict(name):
    head = build(name)
    state = head.state_dict()
    assert state and any(p.requires_grad for p in head.parameters())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    torch.manual_seed(123)  # a differently initialised twin
    block = schema._component("pooling", {"name": name}, "last_token", "model.pooling")
    twin = registry.build("pooling", block, hidden_size=H, num_layers=L).double().eval()
    inputs = pad(rows([3, 6], seed=7), "right", fill=0.0)
    assert not torch.allclose(pool(twin, *inputs), pool(head, *inputs))
    twin.load_state_dict(torch.load(buf))
    assert torch.equal(pool(twin, *inputs), pool(head, *inputs))


def test_bad_pooling_configs_name_the_key():
    with pytest.raises(ConfigError, match=r"^model\.pooling\.num_heads: 3 does not divide the hidden size 16$"):
        build("latent_attention", num_heads=3)
    with pytest.raises(ConfigError, match=r"^model\.pooling\.num_latents: must be >= 1"):
        build("latent_attention", num_latents=0)
    with pytest.raises(ConfigError, match=r"^model\.pooling\.token: 'first' is not accepted"):
        build("multi_layer", token="first")


ATTENTION_KEYS = [
    "latents",
    "attention.in_proj_weight",
    "attention.in_proj_bias",
    "attention.out_proj.weight",
    "attention.out_proj.bias",
    "mlp.0.weight",
    "mlp.0.bias",
    "mlp.2.weight",
    "mlp.2.bias",
]


@pytest.mark.parametrize("name", ["latent_attention", "multi_layer"])
def test_shared_attention_block_keeps_keys_order_and_seeded_init(name):
    """The heads share one block (pooling/_attention.py) without changing what checkpoints hold:
    the same state_dict keys in the same order (saved optimizer state follows parameter order),
    and, seeded alike, the same initial values as the heads' original construction."""
    from torch import nn

    r, heads, ratio = 4, 2, 2.0
    torch.manual_seed(0)
    block = schema._component(
        "pooling", {"name": name, "num_latents": r, "num_heads": heads, "mlp_ratio": ratio}, "last_token", "model.pooling"
    )
    head = registry.build("pooling", block, hidden_size=H, num_layers=L)
    expected_keys = (["layer_embedding"] if name == "multi_layer" else []) + ATTENTION_KEYS
    assert list(head.state_dict()) == expected_keys
    assert [k for k, _ in head.named_parameters()] == expected_keys

    torch.manual_seed(0)  # the original construction, written out: latents, attention, MLP
    reference = {"latents": torch.randn(r, H) * H**-0.5}
    reference.update({f"attention.{k}": v for k, v in nn.MultiheadAttention(H, heads, batch_first=True).state_dict().items()})
    mlp = nn.Sequential(nn.Linear(H, int(H * ratio)), nn.GELU(), nn.Linear(int(H * ratio), H))
    reference.update({f"mlp.{k}": v for k, v in mlp.state_dict().items()})
    if name == "multi_layer":
        reference["layer_embedding"] = torch.zeros(L + 1, H)
    state = head.state_dict()
    for key in expected_keys:
        assert torch.equal(state[key], reference[key]), key
