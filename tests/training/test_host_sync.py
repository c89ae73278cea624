"""Host overhead of a training step (docs/gradcache.md, "Host overhead"): what would stall a GPU's
launch queue, counted on the CPU by ``SyncCounter``; the host-prepared backbone inputs equal the
model's own; pinned batches on CUDA only; ``train.compile`` wiring."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from bench.host_sync import SyncCounter
from embedkit.config.loader import compose
from embedkit.data.batch import ChunkCollate, TrainBatch
from embedkit.data.demo import train_examples
from embedkit.data.schema import Item
from embedkit.training.module import EmbeddingModule
from tests.helpers.cli import SMALL_DEMO
from tests.helpers.images import speckled_image

#: transformers' SDPA mask builder reads the padding mask back (can it skip the mask?): at most two
#: reads per language-model forward; everything else of a step may read back once, the optimizer
#: step's non-finite check
MASK_SITE = "transformers/masking_utils.py"
PER_FORWARD, PER_STEP = 2, 1


class CountOneStep(L.Callback):
    """Counts from the start of training batch ``at`` to the start of the next one: the step, and
    Lightning's bookkeeping after it (metrics, progress bar, logging)."""

    def __init__(self, at: int):
        self.at, self.counter = at, SyncCounter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.at:
            self.counter.__enter__()
        elif batch_idx == self.at + 1:
            self.counter.__exit__(None, None, None)


def test_a_gradcache_training_step_reads_back_from_the_device_only_where_documented():
    """The tiny Qwen2-VL demo (images and captions), chunks of 2 (GradCache on), through Lightning. Before
    this was fixed one such step made 130+ reads (transformers' M-RoPE and vision bookkeeping per item
    and per image, a finite check per parameter, the progress-bar loss)."""
    cfg = compose(["recipe=demo", *SMALL_DEMO, "train.global_batch_size=8", "train.chunk_size=2",
                   "data.train.task_batch_size=8", "trainer.max_steps=3"])
    module = EmbeddingModule.from_config(cfg)
    collate = ChunkCollate(module.encoder.processor(), 2, 0, sort=True)
    examples = list(train_examples(cfg["data"]["demo"], 0, 24))
    batches = [collate(examples[i : i + 8]) for i in range(0, 24, 8)]  # collated outside the count
    count = CountOneStep(at=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[count])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 3
    c = count.counter
    forwards = 2 * (len(batches[1].query_chunks) + len(batches[1].candidate_chunks)) - 1  # the kept chunk: once
    assert forwards == 15
    mask = sum(n for site, n in c.counts.items() if MASK_SITE in site)
    assert mask <= PER_FORWARD * forwards, c.report()
    assert c.total() - mask <= PER_STEP, c.report()  # host-only reads (torch.optim's step counters) left out
    assert "_guarded_step" in " ".join(c.counts), c.report()  # the one read is there: the counter counts


def test_sync_counter_counts_reads_and_data_dependent_shapes():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        x.sum().item()
        bool(x.any())
        x[x > 2].tolist()
        torch.nonzero(x)
        x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]))
        x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]), output_size=7)  # sized on the host: no sync
        (x * 2).exp()  # no read
    assert sum(c.counts.values()) == 6, c.report()
    assert all("test_host_sync.py" in site for site in c.counts), c.report()
    assert x[:2].tolist() == [0.0, 1.0] and not c.counts.get("?")  # the patched methods are restored


def _families():
    from embedkit.backbones.llava_onevision import LlavaOnevision
    from embedkit.backbones.phi3_v import Phi3V
    from embedkit.backbones.qwen2_vl import HOST_KEYS, Qwen2VLBackbone

    qwen = dict(min_pixels=28 * 28, max_pixels=112 * 112)
    return {"qwen2_vl": (Qwen2VLBackbone, qwen, HOST_KEYS),
            "phi3_v": (Phi3V, {}, ("image_grids", "image_token_index")),
            "llava_onevision": (LlavaOnevision, {}, ("image_sizes_host", "image_token_index"))}


@pytest.mark.parametrize("family", ["qwen2_vl", "phi3_v", "llava_onevision"])
def test_host_prepared_inputs_give_the_models_own_outputs_without_per_image_syncs(family):
    """The processor's host-side keys (positions, sizes, image-token positions) against the same chunk
    without them (the model computing everything on the device): hidden states, every layer and every
    gradient equal; per forward and backward only the SDPA mask check reads back."""
    cls, kwargs, keys = _families()[family]
    backbone = cls(seed=0, tiny=True, freeze_vision=False, **kwargs).train()
    sizes = [(56, 56), (112, 56), None, (84, 112), (56, 56), (112, 56)]
    items = [Item(text="a picture " * (i + 1), image=speckled_image(*s, i) if s else None) for i, s in enumerate(sizes)]
    prepared = backbone.make_processor()(items)
    assert all(k in prepared for k in keys if k != "vision_order")  # vision_order: only when sizes interleave
    plain = {k: v for k, v in prepared.items() if k not in keys}
    params = [p for p in backbone.parameters() if p.requires_grad]
    results = []
    for inputs in (prepared, plain):
        with SyncCounter() as c:
            out = backbone(inputs, output_all_layers=True)
            grads = torch.autograd.grad(out.hidden.pow(2).sum(), params, allow_unused=True)
        results.append((out, grads, c))
    (a, ga, ca), (b, gb, cb) = results
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-6, rtol=0)
    for x, y in zip(a.all_layers, b.all_layers):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert sum(g is not None for g in ga) > 0
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert ca.total() - sum(n for s, n in ca.counts.items() if MASK_SITE in s) == 0, ca.report()
    assert cb.total() > ca.total(), cb.report()  # the model's own path does read back: the test can fail


def test_pinned_memory_on_cuda_only(monkeypatch):
    from types import SimpleNamespace

    from embedkit.data.datamodule import EmbeddingDataModule

    dm = EmbeddingDataModule.__new__(EmbeddingDataModule)
    for device, expected in (("cpu", False), ("cuda", True)):
        dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
        assert dm.pin_memory() is expected
    pinned = []

    def fake_pin(t):  # CPU-only torch cannot pin: record what would be pinned
        out = t.clone()
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    chunk = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3), "groups": [[3, 2, 0]]}
    batch = TrainBatch([chunk], [dict(chunk)], 2, 0, ["t", "t"], candidate_keys=torch.arange(2),
                       query_restore=torch.tensor([1, 0]), padded_tokens=12, real_tokens=12)
    out = batch.pin_memory()
    assert len(pinned) == 2 + 2 + 1 + 1  # both chunks' tensors, the keys, the one restore
    assert out.query_chunks[0]["input_ids"] is pinned[0] and out.query_chunks[0]["groups"] == [[3, 2, 0]]
    assert out.candidate_restore is None and out.padded_tokens == 12 and out.per_device_batch == 2


def test_train_compile_encodes_every_chunk_through_the_compiled_forward(monkeypatch):
    """``train.compile=true``: the encoder's forward is compiled once and every forward pass of the step
    runs through it, with the eager loss and gradients. Inductor takes minutes on a 2-core CPU, so the
    compiler here is dynamo with the eager backend (the real capture, no code generation)."""
    real, made, passes = torch.compile, [], []

    def compile_spy(fn, **kwargs):
        made.append(fn)
        compiled = real(fn, backend="eager")

        def run(*args, **kw):
            passes.append(1)
            return compiled(*args, **kw)

        return run

    monkeypatch.setattr(torch, "compile", compile_spy)
    base = ["recipe=demo", *SMALL_DEMO, "model.backbone.name=hf_text", "model.backbone.tiny=true",
            "data.demo.text_only=true"]
    results = {}
    for flag in ("false", "true"):
        cfg = compose(base + [f"train.compile={flag}"])
        module = EmbeddingModule.from_config(cfg).train()
        batch = ChunkCollate(module.encoder.processor(), 2, 0, sort=True)(list(train_examples(cfg["data"]["demo"], 0, 8)))
        out = module.backward_batch(batch, lambda t: t.backward())
        results[flag] = (out.loss, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}, module)
    assert len(made) == 1 and made[0] == results["true"][2].encoder.forward
    assert len(passes) == 2 * 8 - 1  # 4 + 4 chunks, all replayed but the kept one
    torch.testing.assert_close(results["true"][0], results["false"][0], atol=1e-5, rtol=0)
    for n, g in results["false"][1].items():
        torch.testing.assert_close(results["true"][1][n], g, atol=1e-5, rtol=1e-4, msg=n)
    assert not any("_orig_mod" in k for k in results["true"][2].state_dict())  # one copy of the weights


def test_qwen2_vl_host_positions_equal_transformers_own():
    """``host_inputs`` (numpy, in the loader workers) against transformers' ``get_rope_index`` and
    ``vision_utils`` on the same chunk: images of five shapes, text-only rows, right padding."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    from embedkit.backbones.qwen2_vl import Qwen2VLBackbone

    backbone = Qwen2VLBackbone(seed=0, tiny=True, min_pixels=28 * 28, max_pixels=168 * 168)
    sizes = [(56, 56), (168, 56), None, (84, 140), (56, 56), None, (140, 168)]
    texts = ["a b", "<|image_1|> then words after the image", "only text, longer than the rest", "x", "", "y", "z z"]
    items = [Item(text=t, image=speckled_image(*s, i) if s else None) for i, (t, s) in enumerate(zip(texts, sizes))]
    inputs = backbone.make_processor()(items)
    assert inputs["attention_mask"].min() == 0  # padded rows
    positions, _ = backbone.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"],
                                                 attention_mask=inputs["attention_mask"])
    assert torch.equal(inputs["rope_position_ids"], positions)
    grid = inputs["image_grid_thw"]
    assert torch.equal(inputs["vision_cu_seqlens"], get_vision_cu_seqlens(grid))
    assert torch.equal(inputs["vision_position_ids"], get_vision_position_ids(grid, backbone.merge_size))
    assert len({tuple(g) for g in grid.tolist()}) == 4 and "vision_order" in inputs  # sizes interleaved
