"""GradCache equals the full-batch gradient, with dropout replayed per chunk."""

import pytest
import torch
from torch import nn

from embedkit.losses.base import call_loss
from embedkit.losses.infonce import InfoNCE
from embedkit.losses.teacher import TeacherBatch
from embedkit.training.gradcache import cached_step


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 8))

    def forward(self, x):
        return nn.functional.normalize(self.net(x), dim=-1)


class LayeredEncoder(Encoder):
    """Two "layers" of embeddings [n, 2, 8], for losses that ask for per-layer embeddings."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(16, 8)

    def forward(self, x):
        h = self.net[2](self.net[1](self.net[0](x)))
        return nn.functional.normalize(torch.stack([self.first(h), self.net[3](h)], dim=1), dim=-1)


def _grads(chunk: int, seed: int = 0):
    torch.manual_seed(0)
    enc, loss = Encoder(), InfoNCE(temperature=0.1, learnable_temperature=True)
    x = torch.randn(8, 6)
    q_in, c_in = x, x.flip(0) + 0.1
    chunks = list(q_in.split(chunk)) + list(c_in.split(chunk))
    nq = len(q_in.split(chunk))
    torch.manual_seed(seed)
    out = cached_step(enc, chunks, lambda e: loss(torch.cat(e[:nq]), torch.cat(e[nq:])), lambda t: t.backward())
    params = list(enc.parameters()) + list(loss.parameters())
    return out.loss, [p.grad.clone() for p in params]


def test_chunked_equals_full_batch_with_dropout():
    cached_loss, cached = _grads(chunk=2)
    _, other_draw = _grads(chunk=2, seed=1)
    # one chunk per side vs four: dropout masks differ per chunk layout, so compare like with like:
    # the full-batch reference is the same chunk layout encoded with grad in one graph
    torch.manual_seed(0)
    enc, loss = Encoder(), InfoNCE(temperature=0.1, learnable_temperature=True)
    x = torch.randn(8, 6)
    chunks = list(x.split(2)) + list((x.flip(0) + 0.1).split(2))
    torch.manual_seed(0)
    embs = [enc(c) for c in chunks]
    ref = loss(torch.cat(embs[:4]), torch.cat(embs[4:]))
    ref.loss.backward()
    ref_grads = [p.grad for p in list(enc.parameters()) + list(loss.parameters())]
    torch.testing.assert_close(cached_loss, ref.loss.detach(), atol=1e-6, rtol=0)
    for a, b in zip(cached, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(cached[0], other_draw[0])  # dropout is on: another draw, another gradient


def test_without_dropout_chunk_size_does_not_matter():
    def grads(chunk):
        torch.manual_seed(0)
        enc, loss = Encoder().eval(), InfoNCE(temperature=0.1)
        x = torch.randn(8, 6)
        chunks = list(x.split(chunk)) + list((x.flip(0) + 0.1).split(chunk))
        nq = 8 // chunk
        cached_step(enc, chunks, lambda e: loss(torch.cat(e[:nq]), torch.cat(e[nq:])), lambda t: t.backward())
        return [p.grad for p in enc.parameters()]

    for a, b in zip(grads(8), grads(2)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_trainer_options_that_clash_with_manual_optimization_are_refused():
    import pytest

    from embedkit.config.loader import compose
    from embedkit.errors import UserError

    for key, value, instead in [("accumulate_grad_batches", 4, "train.accumulate_steps"),
                                ("gradient_clip_val", 1.0, "train.clip_grad_norm")]:
        with pytest.raises(UserError, match=rf"trainer\.{key}: refused.*{instead.replace('.', '[.]')}"):
            compose(["recipe=demo", f"trainer.{key}={value}"])


def test_gradient_checkpointing_non_reentrant_with_dropout_replays_exactly():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(Encoder):
        def forward(self, x):
            return nn.functional.normalize(checkpoint(self.net, x, use_reentrant=False), dim=-1)

    def grads(cls, chunk):
        torch.manual_seed(0)
        enc, loss = cls(), InfoNCE(temperature=0.1)
        x = torch.randn(8, 6)
        chunks = list(x.split(chunk)) + list((x.flip(0) + 0.1).split(chunk))
        torch.manual_seed(3)
        cached_step(enc, chunks, lambda e: loss(torch.cat(e[: 8 // chunk]), torch.cat(e[8 // chunk :])),
                    lambda t: t.backward())
        return [p.grad for p in enc.parameters()]

    # same dropout draws with and without checkpointing (both replay the per-chunk RNG state)
    for a, b in zip(grads(Checkpointed, 2), grads(Encoder, 2)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def one_step(enc, chunks, loss_of, cached: bool):
    """One training step over ``chunks`` (the encoder's inputs; ``loss_of`` maps their embeddings to a
    ``LossOutput``), its gradients left in ``enc``: through GradCache (``cached_step``) or as one graph, the
    dropout seeded alike, so the two can be compared. Returns the ``LossOutput``."""
    torch.manual_seed(5)
    if cached:
        return cached_step(enc, chunks, loss_of, lambda t: t.backward())
    out = loss_of([enc(c) for c in chunks])
    out.loss.backward()
    return out


def _every_loss():
    from embedkit.config import registry

    return registry.choices("loss")


@pytest.mark.parametrize("name", _every_loss())
def test_every_loss_chunked_equals_one_graph_with_dropout(name):
    from embedkit.config import registry
    from embedkit.config.loader import compose

    block = compose(["recipe=demo", f"loss={name}"])["loss"]

    def run(cached):
        torch.manual_seed(0)
        loss = registry.build("loss", block, embedding_dim=8, num_layers=2, seed=0)
        enc = LayeredEncoder() if getattr(loss, "needs_layers", False) else Encoder()
        x = torch.randn(8, 6)
        chunks = list(x.split(2)) + list((x.flip(0) + 0.1).split(2)) + list((x.roll(3, 0) - 0.2).split(2))

        # the teacher wrappers (distill, soft_labels) get fixed teacher data: 8 queries, 16 candidates, scores
        g = torch.Generator().manual_seed(1)
        teacher = TeacherBatch(torch.randn(8, 5, generator=g), torch.randn(16, 5, generator=g),
                               torch.rand(8, 2, generator=g))

        def loss_of(e):  # 8 queries, 8 positives, 1 hard negative each
            n = torch.cat(e[8:])
            return call_loss(loss, torch.cat(e[:4]), torch.cat(e[4:8]), n.view(8, 1, *n.shape[1:]), teacher=teacher)

        out = one_step(enc, chunks, loss_of, cached)
        return out.loss.detach(), [p.grad for p in list(enc.parameters()) + list(loss.parameters())]

    (loss_c, grads_c), (loss_r, grads_r) = run(True), run(False)
    torch.testing.assert_close(loss_c, loss_r, atol=1e-6, rtol=0)
    assert all(g is not None for g in grads_c)
    for a, b in zip(grads_c, grads_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
