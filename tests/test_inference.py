"""The inference engine (``embedkit/inference.py``): embeddings do not depend on the order and batch
composition it chooses (<= 1e-6 against one-at-a-time encoding, every family, text and image items,
token sets of a multi-vector head), results come back in input order, the plan obeys its limits,
costs are read without decoding images, and cost ordering cuts padding."""

from __future__ import annotations

import io
import random

import pytest
import torch
from PIL import Image

from embedkit.data.schema import Item
from embedkit.encoder import Encoder
from embedkit.errors import UserError
from embedkit.inference import Batching, LazyItems, encode_in_order, item_costs, plan_batches
from tests.helpers.images import speckled_image
from tests.helpers.models import tiny_encoder

WORDS = "a red circle at the top left find blue square small green triangle in centre of picture".split()
FAMILIES = ("hf_text", "qwen2_vl", "llava_onevision", "phi3_v")


def corpus(family: str, seed: int = 0) -> list[Item]:
    """Uneven items: texts of 1..30 words; for a VLM also images of several sizes, alone and with text."""
    rng = random.Random(seed)
    texts = [Item(text=" ".join(rng.choice(WORDS) for _ in range(n))) for n in (1, 30, 4, 17, 2, 9, 25, 3)]
    if family == "hf_text":
        return texts
    sizes = [(56, 56), (120, 40), (30, 90), (112, 112), (84, 56), (40, 160)]
    images = [Item(image=speckled_image(w, h, i)) for i, (w, h) in enumerate(sizes)]
    mixed = [Item(text=" ".join(WORDS[: 2 + 3 * i]), image=speckled_image(w, h, 10 + i))
             for i, (w, h) in enumerate([(64, 48), (96, 96), (56, 84)])]
    out = texts + images + mixed
    rng.shuffle(out)
    return out


def one_at_a_time(encoder: Encoder, items: list[Item]) -> torch.Tensor:
    return torch.cat([encoder.encode_items([it], batch_size=1, sort=False) for it in items])


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_do_not_depend_on_the_order_and_batches_the_engine_chooses(family):
    encoder = tiny_encoder(family)
    items = corpus(family)
    ref = one_at_a_time(encoder, items)
    assert ref.shape == (len(items), encoder.embedding_dim)
    assert torch.cdist(ref, ref).topk(2, largest=False).values[:, 1].min() > 1e-3  # items really differ
    for batching in (dict(batch_size=4), dict(batch_size=5, sort=False), dict(batch_size=32, batch_tokens=120)):
        got = encoder.encode_items(items, **batching)
        assert (got - ref).abs().max().item() <= 1e-6, batching
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(3)).tolist()
    shuffled = encoder.encode_items([items[i] for i in perm], batch_size=3)
    assert (shuffled - ref[perm]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("family", ["hf_text", "qwen2_vl"])
def test_token_sets_come_back_in_input_order_equal_to_one_at_a_time(family):
    encoder = tiny_encoder(family, "model.pooling=multi_vector", "model.pooling.dim=8", "model.pooling.max_tokens=12")
    items = corpus(family, seed=1)
    ref = one_at_a_time(encoder, items)
    assert ref.shape == (len(items), 12, 8)
    got = encoder.encode_items(items, batch_size=4, batch_tokens=200)
    # float32 rounding: a batch's padding changes the attention's summation order; unit token vectors move
    # by up to ~1e-6 (1.01e-6 seen with qwen2_vl after its tiny vocabulary grew), a misplaced row by ~1
    assert (got - ref).abs().max().item() <= 2e-6
    assert (ref.norm(dim=-1) == 0).any() and (ref.norm(dim=-1) > 0.99).any()  # short sets padded with zeros


def test_token_sets_of_different_lengths_are_padded_at_their_input_rows():
    def forward(inputs):  # a set of as many token vectors as the longest item of the batch
        n, t = inputs["attention_mask"].shape
        return inputs["attention_mask"][..., None].float().expand(n, t, 2) * inputs["value"][:, None, None]

    class Proc:
        def __call__(self, items):
            lens = [len(it.text) for it in items]
            mask = torch.tensor([[1] * n + [0] * (max(lens) - n) for n in lens])
            return {"attention_mask": mask, "value": torch.tensor([float(n) for n in lens])}

        def costs(self, items):
            return [len(it.text) for it in items]

    items = [Item(text="x" * n) for n in (2, 7, 1, 5, 3)]
    got, stats = encode_in_order(items, forward, Proc(), Batching(batch_size=2))
    assert got.shape == (5, 7, 2) and stats.batches == 3
    for i, it in enumerate(items):
        n = len(it.text)
        assert (got[i, :n] == n).all() and (got[i, n:] == 0).all()


def test_the_plan_keeps_every_item_once_within_its_limits():
    rng = random.Random(0)
    costs = [rng.choice([3, 10, 40, 90, 300]) for _ in range(200)]
    for batching in (Batching(8), Batching(8, 400), Batching(8, 400, sort=False), Batching(5, sort=False)):
        plan = plan_batches(costs, len(costs), batching)
        assert sorted(i for b in plan for i in b) == list(range(200))
        for b in plan:
            assert len(b) <= 8 and (len(b) * max(costs[i] for i in b) <= 400 or len(b) == 1 or not batching.batch_tokens)
        if batching.sort:
            flat = [costs[i] for b in plan for i in b]
            assert flat == sorted(flat, reverse=True)
        else:
            assert [i for b in plan for i in b] == list(range(200))
    with pytest.raises(ValueError, match="batch_size: must be >= 1"):
        Batching(0)


class PNGItems(LazyItems):
    """Images kept as encoded bytes; ``self[i]`` decodes, ``sized(i)`` only reads the header."""

    def __init__(self, blobs: list[bytes]):
        self.blobs, self.decoded = blobs, 0

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        self.decoded += 1
        return Item(text="a picture", image=Image.open(io.BytesIO(self.blobs[i])).convert("RGB"))

    def sized(self, i):
        with Image.open(io.BytesIO(self.blobs[i])) as im:
            return Item(text="a picture", image=im)  # closed, never decoded: its size is known


def test_costs_read_image_sizes_without_decoding_and_lazy_items_equal_decoded_ones():
    encoder = tiny_encoder("qwen2_vl")
    images = [speckled_image(w, h, i) for i, (w, h) in enumerate([(56, 56), (140, 56), (84, 168), (56, 112)])]
    blobs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    lazy = PNGItems(blobs)
    eager = [Item(text="a picture", image=im) for im in images]
    assert item_costs(lazy, encoder.processor()) == encoder.processor().costs(eager)
    assert lazy.decoded == 0
    got = encoder.encode_items(lazy, batch_size=3)
    assert lazy.decoded == len(blobs)  # each item made once, when its batch was processed
    assert (got - one_at_a_time(encoder, eager)).abs().max().item() <= 1e-6


def test_loader_workers_give_the_same_embeddings_and_progress_is_reported():
    encoder = tiny_encoder("hf_text")
    items = corpus("hf_text") * 3
    seen = []
    got = encoder.encode_items(items, batch_size=4, num_workers=2, progress=lambda done, total: seen.append((done, total)))
    assert (got - encoder.encode_items(items, batch_size=4)).abs().max().item() <= 1e-6
    assert seen[-1] == (len(items), len(items)) and len(seen) == -(-len(items) // 4)


def test_cost_ordering_pads_less_on_uneven_items():
    encoder = tiny_encoder("qwen2_vl")
    items = corpus("qwen2_vl")
    process = encoder.processor()
    _, in_order = encode_in_order(items, encoder, process, Batching(4, sort=False))
    _, ordered = encode_in_order(items, encoder, process, Batching(4))
    assert in_order.real_tokens == ordered.real_tokens == sum(process.costs(items))
    assert ordered.pad_fraction < in_order.pad_fraction
    assert encoder.encode_items([]).shape == (0, encoder.embedding_dim)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_user_error_in_processing_stays_one_line_in_loader_workers(workers):
    class Missing(LazyItems):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 2:
                raise UserError("input: image not found: x.png")
            return Item(text="a red circle")

    encoder = tiny_encoder("hf_text")
    with pytest.raises(UserError) as caught:
        encoder.encode_items(Missing(), batch_size=1, sort=False, num_workers=workers)
    assert str(caught.value) == "input: image not found: x.png"
