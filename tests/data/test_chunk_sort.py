"""Cost-aware chunking: each backbone's arithmetic token count, first-fit-decreasing packing, the
restored order (sorted and arrival-order chunking give the same step), and the padding it saves."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from embedkit.backbones.hf_text import HFText
from embedkit.backbones.llava_onevision import LlavaOnevision
from embedkit.backbones.phi3_v import Phi3V
from embedkit.backbones.qwen2_vl import Qwen2VLBackbone
from embedkit.data.batch import ChunkCollate, cost_order, packed_by_tokens
from embedkit.data.schema import Example, Item
from embedkit.losses.infonce import InfoNCE
from embedkit.training.module import EmbeddingModule

WORDS = "a red circle at the top left find blue square small green triangle in centre of picture".split()


def _image(w, h):
    img = Image.new("RGB", (w, h), (200, 40, 40))
    for x in range(0, w, 5):
        img.putpixel((x, x % h), (x % 256, 90, 200))
    return img


def _items(family: str, rng: random.Random) -> list[Item]:
    texts = [Item(text=" ".join(rng.choice(WORDS) for _ in range(n))) for n in (1, 4, 9, 17, 30)]
    if family == "hf_text":
        return texts + [Item(text="")]  # an empty text is one EOS
    sizes = [(56, 56), (30, 90), (120, 40), (224, 112), (33, 333), (400, 60), (112, 224), (84, 84)]
    images = [Item(image=_image(w, h)) for w, h in sizes]
    images += [Item(text="left <|image_1|> right " + " ".join(WORDS[:k]), image=_image(w, h))
               for k, (w, h) in zip((1, 5, 11), ((70, 50), (50, 70), (300, 300)))]
    images.append(Item(text="a caption after the image", image=_image(96, 64)))
    return texts + images


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "phi3_v", "hf_text"])
def test_every_backbones_arithmetic_count_is_what_its_processor_emits(family):
    cls = {"qwen2_vl": Qwen2VLBackbone, "llava_onevision": LlavaOnevision, "phi3_v": Phi3V, "hf_text": HFText}[family]
    kwargs = {"min_pixels": 56 * 56, "max_pixels": 224 * 224} if family == "qwen2_vl" else {}
    processor = cls(seed=0, tiny=True, **kwargs).make_processor()
    assert type(processor).num_tokens is not type(processor).__mro__[-2].num_tokens  # its own arithmetic
    items = _items(family, random.Random(0))
    counted = [processor.num_tokens(it) for it in items]
    emitted = [int(processor([it])["attention_mask"].sum()) for it in items]
    assert counted == emitted == processor.costs(items)
    assert len(set(counted)) >= len(items) // 2  # the items really differ in cost


def test_first_fit_decreasing_respects_size_and_budget_and_keeps_every_item():
    rng = random.Random(0)
    costs = [rng.choice([5, 12, 40, 90, 300, 700]) for _ in range(300)]
    chunks = packed_by_tokens(costs, size=8, budget=800)
    assert sorted(i for c in chunks for i in c) == list(range(300))
    for c in chunks:
        assert len(c) <= 8
        assert len(c) * max(costs[i] for i in c) <= 800 or len(c) == 1
        assert costs[c[0]] == max(costs[i] for i in c)
    # first fit: no item could have gone into an earlier chunk when it was placed
    assert packed_by_tokens([10, 900, 10, 50], size=4, budget=200) == [[1], [3, 0, 2]]
    assert cost_order([3, 7, 3, 9]) == [3, 1, 0, 2]


class WordProcessor:
    """Text items -> word ids, right-padded; ``num_tokens`` by counting words."""

    def __call__(self, items):
        rows = [[1 + WORDS.index(w) for w in it.text.split()] for it in items]
        longest = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    def num_tokens(self, item):
        return len(item.text.split())


def _mixed_examples(n: int, k: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)

    def text():
        return Item(text=" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 3, 25, 30]))))

    return [Example(query=text(), positive=text(), negatives=[text() for _ in range(k)], task="t")
            for _ in range(n)]


def test_sorting_halves_the_padding_of_a_mixed_batch():
    examples = _mixed_examples(64, 1)
    for tokens in (0, 240):
        arrival = ChunkCollate(WordProcessor(), 8, 1, chunk_tokens=tokens)(examples)
        ordered = ChunkCollate(WordProcessor(), 8, 1, chunk_tokens=tokens, sort=True)(examples)
        assert ordered.real_tokens == arrival.real_tokens
        assert arrival.pad_fraction > 0.4
        assert ordered.pad_fraction <= arrival.pad_fraction / 2, (tokens, ordered.pad_fraction, arrival.pad_fraction)
        assert ordered.query_restore is not None and arrival.query_restore is None


class Bag(torch.nn.Module):
    """A module with the backbone's inputs: masked mean of word vectors through an MLP, dropout free,
    in float64 (so summation order, which chunking changes, is far below the tolerance)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(len(WORDS) + 1, 16)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
        self.double()

    def forward(self, inputs):
        mask = inputs["attention_mask"].unsqueeze(-1).double()
        h = self.mlp(self.emb(inputs["input_ids"]))
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


class BagModule(EmbeddingModule):
    """The real ``backward_batch`` (chunk layout, restore, GradCache) around ``Bag``."""

    def __init__(self):
        torch.nn.Module.__init__(self)  # no Lightning trainer: backward_batch only
        self.bag = Bag()
        self.loss_fn = InfoNCE(temperature=0.05)

    def encode(self, inputs):
        return self.bag(inputs)

    def compute_loss(self, q, p, n, candidate_keys=None):
        return self.loss_fn(q, p, n)


@pytest.mark.parametrize("tokens", [0, 200])
def test_sorted_and_arrival_order_chunking_give_the_same_step(tokens):
    examples = _mixed_examples(24, 2, seed=1)

    def step(sort: bool):
        module = BagModule()
        batch = ChunkCollate(WordProcessor(), 4, 2, chunk_tokens=tokens, sort=sort)(examples)
        opt = torch.optim.SGD(module.parameters(), lr=0.5)
        out = module.backward_batch(batch, lambda t: t.backward())
        grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        opt.step()
        return out.loss, grads, dict(module.named_parameters()), batch

    ref_loss, ref_grads, ref_weights, arrival = step(False)
    loss, grads, weights, ordered = step(True)
    assert ordered.candidate_restore is not None
    assert not torch.equal(ordered.candidate_restore, torch.arange(len(ordered.candidate_restore)))
    assert ordered.pad_fraction < arrival.pad_fraction
    assert abs(loss - ref_loss) <= 1e-6
    for n in ref_grads:
        assert (grads[n] - ref_grads[n]).abs().max() <= 1e-6, n
        assert (weights[n] - ref_weights[n]).abs().max() <= 1e-6, n
    # the restore is what makes it exact: the sorted chunks without it give another loss
    ordered.candidate_restore = ordered.query_restore = None
    wrong = BagModule().backward_batch(ordered, lambda t: t.backward())
    assert abs(wrong.loss - ref_loss) > 1e-3


def test_the_loss_is_handed_the_batch_candidate_keys():
    """``backward_batch`` passes the batch's content keys (batch order) to ``compute_loss``, the
    false-negative mask's input, as an argument."""
    seen = []

    class KeyedBag(BagModule):
        def compute_loss(self, q, p, n, candidate_keys=None):
            seen.append(candidate_keys)
            return super().compute_loss(q, p, n)

    batch = ChunkCollate(WordProcessor(), 4, 2, sort=True)(_mixed_examples(8, 2, seed=3))
    KeyedBag().backward_batch(batch, lambda t: t.backward())
    assert seen and all(keys is not None and torch.equal(keys, batch.candidate_keys) for keys in seen)
