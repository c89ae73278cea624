"""The ``qwen2_5_vl`` family (issue 29): host position ids equal transformers' own ``get_rope_index`` (images,
several images, videos with timestamps, mixed chunks), the forward equals ``self.model(**inputs)``, token
counts by arithmetic, ``second_per_grid_ts`` from timestamps, LoRA on the language model only, freezing,
loading back from a folder."""

from __future__ import annotations

import pytest
import torch

from embedkit.backbones.lora import adapted_module_names, apply_lora
from embedkit.backbones.qwen2_vl import Qwen2VLBackbone, Qwen25VLBackbone, seconds_per_grid
from embedkit.backbones.qwen2_vl.qwen2_5_vl import DEFAULT_SECONDS_PER_GRID
from embedkit.config import registry
from embedkit.data.schema import Item
from embedkit.data.video import Frames
from embedkit.errors import UserError
from tests.helpers.images import speckled_image

PIXELS = dict(min_pixels=28 * 28, max_pixels=112 * 112)
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "dora": False, "target": None}
DECODER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def backbone():
    return Qwen25VLBackbone(seed=0, tiny=True, **PIXELS).eval()


def video(n: int, step: float | None = 0.5, w: int = 84, h: int = 56, seed: int = 0) -> Frames:
    stamps = None if step is None else [1.0 + i * step for i in range(n)]
    return Frames([speckled_image(w, h, seed + i) for i in range(n)], stamps, list(range(n)), n)


def images(k: int, seed: int = 0):
    sizes = [(56, 56), (112, 56), (84, 140)]
    return [speckled_image(*sizes[i % len(sizes)], seed + i) for i in range(k)]


CHUNKS = {
    "image": [Item(text="a picture", images=images(1))],
    "three_images": [Item(text="<|image_3|> three <|image_1|> images <|image_2|>", images=images(3, 5))],
    "video": [Item(text="a clip <|video_1|> of six frames", video=video(6, 0.25))],
    "mixed": [Item(text="just text"), Item(text="two", images=images(2, 1)),
              Item(text="slow <|video_1|>", video=video(4, 1.0, seed=3)),
              Item(text="fast", video=video(7, 0.1, 56, 84, seed=9)), Item(text="no stamps", video=video(3, None))],
}


def transformers_positions(backbone, chunk):
    positions, _ = backbone.model.get_rope_index(
        chunk["input_ids"], chunk["mm_token_type_ids"], image_grid_thw=chunk.get("image_grid_thw"),
        video_grid_thw=chunk.get("video_grid_thw"), second_per_grid_ts=chunk.get("second_per_grid_ts"),
        attention_mask=chunk["attention_mask"])
    return positions


@pytest.mark.parametrize("name", list(CHUNKS))
def test_host_position_ids_equal_transformers_get_rope_index(backbone, name):
    chunk = backbone.make_processor()(CHUNKS[name])
    real = chunk["attention_mask"].bool()
    assert torch.equal(chunk["position_ids"][:, real], transformers_positions(backbone, chunk)[:, real])


def test_video_temporal_ids_follow_seconds(backbone):
    """tokens_per_second 2 (tiny config): frames 0.25 s apart -> 0.5 s per temporal patch -> interval 1;
    1 s apart -> interval 4; no timestamps -> transformers' default 1 s per patch -> interval 2."""
    processor = backbone.make_processor()
    for step, interval in ((0.25, 1), (1.0, 4), (None, 2)):
        chunk = processor([Item(text="v", video=video(6, step))])
        temporal = chunk["position_ids"][0, 0][chunk["mm_token_type_ids"][0] == 2]
        assert sorted(set((temporal - temporal[0]).tolist())) == [0, interval, 2 * interval], step
    assert seconds_per_grid(video(1, 0.5), 2) == DEFAULT_SECONDS_PER_GRID
    assert seconds_per_grid(video(4, 0.0), 2) == DEFAULT_SECONDS_PER_GRID
    assert seconds_per_grid(video(5, 0.2), 2) == pytest.approx(0.4)


@pytest.mark.parametrize("name", list(CHUNKS))
def test_forward_equals_transformers_own(backbone, name):
    """``position_ids`` given (host) vs the model computing them from ``mm_token_type_ids`` and
    ``second_per_grid_ts``; and the batched vision attention vs transformers' own, on window attention."""
    chunk = backbone.make_processor()(CHUNKS[name] + [Item(text="text only row, longer than the others")])
    own = {k: v for k, v in chunk.items() if k != "position_ids"}
    plain = Qwen25VLBackbone(seed=0, tiny=True, batched_vision_attention=False, **PIXELS).eval()
    with torch.no_grad():
        ours = backbone(chunk).hidden
        theirs = plain.model(**own, use_cache=False).last_hidden_state
    real = chunk["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)


def test_mm_token_type_ids_matter_and_are_always_there(backbone):
    """Guard of the fact behind always sending them: without them (and without ``position_ids``)
    Qwen2.5-VL silently uses 1-D positions and the outputs change."""
    processor = backbone.make_processor()
    assert "mm_token_type_ids" in processor([Item(text="only text")])
    chunk = processor(CHUNKS["image"])
    bare = {k: v for k, v in chunk.items() if k not in ("position_ids", "mm_token_type_ids")}
    with torch.no_grad():
        assert not torch.allclose(backbone(chunk).hidden, backbone.model(**bare, use_cache=False).last_hidden_state)


def test_the_step_does_not_run_get_rope_index(backbone, monkeypatch):
    """With the host's ``position_ids`` the model never calls its own ``get_rope_index`` (a Python loop with
    host syncs per row and visual): a chunk of images and videos runs with it made to raise."""
    chunk = backbone.make_processor()(CHUNKS["mixed"])

    def refuse(*args, **kwargs):
        raise AssertionError("get_rope_index called in the step")

    monkeypatch.setattr(backbone.model, "get_rope_index", refuse)
    with torch.no_grad():
        backbone(chunk)
    with pytest.raises(AssertionError, match="get_rope_index called"):
        backbone.model(**{k: v for k, v in chunk.items() if k != "position_ids"}, use_cache=False)


def test_gradient_checkpointing_backward_matches():
    """Gradient checkpointing (language model and vision tower, trainable) gives the same gradients."""
    chunk = None
    grads = []
    for checkpointing in (False, True):
        b = Qwen25VLBackbone(seed=0, tiny=True, freeze_vision=False, gradient_checkpointing=checkpointing, **PIXELS)
        b.train()
        chunk = chunk or b.make_processor()(CHUNKS["mixed"])
        b(chunk).hidden.square().mean().backward()
        grads.append({n: p.grad for n, p in b.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_num_tokens_is_the_processed_length(backbone):
    processor = backbone.make_processor()
    items = [it for chunk in CHUNKS.values() for it in chunk]
    chunk = processor(items)
    assert chunk["attention_mask"].sum(1).tolist() == [processor.num_tokens(it) for it in items]


def test_lora_targets_the_language_model_only():
    """The vision MLP has ``gate/up/down_proj`` too (qwen-vl-backbones.md pitfall 8): not adapted."""
    lora = apply_lora(Qwen25VLBackbone(seed=0, tiny=True, **PIXELS), LORA)
    assert any(n.endswith("mlp.gate_proj") for n, _ in lora.named_modules() if n.startswith("model.visual."))
    assert adapted_module_names(lora) == {f"model.language_model.layers.{i}.{m}" for i in range(2) for m in DECODER}
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and n.startswith("model.language_model.") for n in trainable)


def test_freezing_the_vision_tower():
    frozen = dict(Qwen25VLBackbone(seed=0, tiny=True, **PIXELS).named_parameters())
    assert not any(p.requires_grad for n, p in frozen.items() if n.startswith("model.visual."))
    assert all(p.requires_grad for n, p in frozen.items() if not n.startswith("model.visual."))
    unfrozen = Qwen25VLBackbone(seed=0, tiny=True, freeze_vision=False, **PIXELS)
    assert all(p.requires_grad for n, p in unfrozen.named_parameters())


def test_registered_and_loads_back_from_a_folder(backbone, tmp_path):
    assert registry.get("backbone", "qwen2_5_vl").factory is Qwen25VLBackbone
    backbone.save_pretrained(str(tmp_path / "q25"))
    loaded = Qwen25VLBackbone(seed=1, path=str(tmp_path / "q25"), **PIXELS).eval()
    chunk = backbone.make_processor()(CHUNKS["mixed"])
    with torch.no_grad():
        assert torch.equal(loaded(chunk).hidden, backbone(chunk).hidden)
    Qwen2VLBackbone(seed=0, tiny=True).save_pretrained(str(tmp_path / "q2"))
    with pytest.raises(UserError) as err:
        Qwen25VLBackbone(seed=0, path=str(tmp_path / "q2"))
    assert "qwen2_vl" in str(err.value) and "\n" not in str(err.value)


JINA_HF = "HF jinaai/jina-embeddings-v4 @ 509c533 (qwen-vl-backbones.md sec. 2)"
JINA = [  # (key, value, source): jina-embeddings-v4 single-vector, retrieval adapter
    ("model.backbone.name", "qwen2_5_vl", JINA_HF + ": Qwen2_5_VLForConditionalGeneration"),
    ("model.pooling.name", "mean", JINA_HF + ": single_vector_pool_strategy mean"),
    ("model.normalize", True, JINA_HF),
    ("model.backbone.max_length", 8192, JINA_HF + ": text_max_length"),
    ("loss.name", "matryoshka", JINA_HF + ": TRUNCATE_DIMS"),
    ("loss.dims", [128, 256, 512, 1024, 2048], JINA_HF + ": TRUNCATE_DIMS + the full 2048"),
]


def test_jina_v4_recipe_resolves_with_its_sourced_values():
    """(Its tiny 2-step run: tests/config/test_recipes.py, every shipped recipe.)"""
    from embedkit.config.loader import compose

    cfg = compose(["recipe=jina_v4"])
    wrong = []
    for key, value, source in JINA:
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node != value:
            wrong.append(f"{key}={node!r}, source says {value!r} ({source})")
    assert not wrong, "\n".join(wrong)


def test_the_hub_layout_of_qwen2_5_vl_instruct_loads(backbone, tmp_path):
    """Qwen2.5-VL-*-Instruct on the hub (and a jina-v4 folder saved from it) are
    ``Qwen2_5_VLForConditionalGeneration`` in the legacy key layout (``model.layers.*``, ``model.embed_tokens``,
    ``visual.*``, ``lm_head``; qwen-vl-backbones.md sec. 3.4 probe F): written here by hand, it loads equal."""
    import json

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "hub"
    backbone.save_pretrained(str(folder))
    own = load_file(str(folder / "model.safetensors"))
    assert own and all(k.startswith(("language_model.", "visual.")) for k in own)
    legacy = {("model." + k[len("language_model."):] if k.startswith("language_model.") else k): v
              for k, v in own.items()}
    legacy["lm_head.weight"] = own["language_model.embed_tokens.weight"].clone()
    save_file(legacy, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2_5_VLForConditionalGeneration"]}))
    loaded = Qwen25VLBackbone(seed=1, path=str(folder), **PIXELS).eval()
    chunk = backbone.make_processor()(CHUNKS["mixed"])
    with torch.no_grad():
        assert torch.equal(loaded(chunk).hidden, backbone(chunk).hidden)
