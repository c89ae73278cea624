"""LLaVA-OneVision, Phi-3.5-V and text backbones: round trips, padding invariance, seeding, errors.

Tiny random models built from real transformers classes; no downloads.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from embedkit.backbones.hf_text import HFText
from embedkit.backbones.llava_onevision import LlavaOnevision, anyres_pinpoints, num_image_tokens
from embedkit.backbones.phi3_v import Phi3V, hd_transform
from embedkit.data.schema import Item
from embedkit.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAMILIES = {"llava_onevision": LlavaOnevision, "phi3_v": Phi3V, "hf_text": HFText}


def _image(w, h, colour):
    img = Image.new("RGB", (w, h), colour)
    for x in range(0, w, 7):  # some structure, so crops differ
        for y in range(0, h, 5):
            img.putpixel((x, y), ((x * 13) % 256, (y * 7) % 256, 90))
    return img


def items_for(family: str) -> list[Item]:
    text = [Item(text="a red circle at the top left"), Item(text="find a blue square"),
            Item(text="the image shows a small green triangle in the centre of the picture")]
    if family == "hf_text":
        return text
    return [
        text[0],
        Item(text="<|image_1|> represent the given image", image=_image(56, 40, (200, 30, 30))),
        text[1],
        Item(image=_image(30, 90, (20, 200, 30))),
        Item(text="a photo <|image_1|> of a cat", image=_image(84, 84, (10, 10, 220))),
        text[2],
    ]


def last_token(backbone, items):
    backbone.eval()
    inputs = backbone.make_processor()(items)
    with torch.no_grad():
        out = backbone(inputs)
    last = out.mask.sum(1) - 1
    return out.hidden[torch.arange(len(items)), last]


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request):
    return request.param, FAMILIES[request.param](seed=0, tiny=True)


def test_save_and_load_back_gives_identical_embeddings(tiny, tmp_path):
    family, backbone = tiny
    items = items_for(family)
    backbone.save_pretrained(str(tmp_path))
    loaded = FAMILIES[family](seed=123, path=str(tmp_path))  # the real-checkpoint code path
    assert torch.equal(last_token(backbone, items), last_token(loaded, items))
    assert loaded.hidden_size == backbone.hidden_size and loaded.num_layers == backbone.num_layers


def test_padding_invariance_mixed_text_and_images(tiny):
    family, backbone = tiny
    items = items_for(family)
    batch = last_token(backbone, items)
    inputs = backbone.make_processor()(items)
    assert (inputs["attention_mask"].sum(1) < inputs["attention_mask"].shape[1]).any()  # padding exists
    for i, item in enumerate(items):
        alone = last_token(backbone, [item])[0]
        torch.testing.assert_close(batch[i], alone, atol=1e-5, rtol=1e-5)


def test_all_layers_and_sizes(tiny):
    family, backbone = tiny
    inputs = backbone.make_processor()(items_for(family)[:2])
    out = backbone(inputs, output_all_layers=True)
    assert len(out.all_layers) == backbone.num_layers + 1
    assert out.hidden.shape[-1] == backbone.hidden_size
    assert out.hidden.shape[:2] == out.mask.shape


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_seed_same_outputs(family):
    items = items_for(family)
    first = FAMILIES[family](seed=7, tiny=True)
    assert first.training  # built like a fresh module; the trainer/evaluator sets the mode
    a = last_token(first, items)
    b = last_token(FAMILIES[family](seed=7, tiny=True), items)
    c = last_token(FAMILIES[family](seed=8, tiny=True), items)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_missing_path_is_a_one_line_user_error(family, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError) as err:
        FAMILIES[family](seed=0, path=missing)
    assert missing in str(err.value) and "\n" not in str(err.value)


def test_unsupported_model_type_names_type_and_families(tmp_path):
    text_dir, vlm_dir = tmp_path / "qwen2", tmp_path / "llava"
    HFText(seed=0, tiny=True).save_pretrained(str(text_dir))
    for family in ("llava_onevision", "phi3_v"):
        with pytest.raises(UserError) as err:
            FAMILIES[family](seed=0, path=str(text_dir))
        msg = str(err.value)
        assert "'qwen2'" in msg and "llava_onevision" in msg and "phi3_v" in msg and "hf_text" in msg, msg
    LlavaOnevision(seed=0, tiny=True).save_pretrained(str(vlm_dir))
    with pytest.raises(UserError, match="multimodal 'llava_onevision'"):
        HFText(seed=0, path=str(vlm_dir))
    cfg = json.loads((text_dir / "config.json").read_text())
    (text_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_model"}))
    with pytest.raises(UserError, match="no_such_model"):
        HFText(seed=0, path=str(text_dir))


def test_hf_text_refuses_images_clearly():
    backbone = HFText(seed=0, tiny=True)
    with pytest.raises(UserError, match="embeds text only"):
        backbone.make_processor()([Item(text="a cat", image=_image(28, 28, (0, 0, 0)))])


def test_hf_text_loads_a_bert_encoder(tmp_path):
    """Any AutoModel: a tiny BERT saved with its tokenizer loads and embeds; no EOS (BERT has none)."""
    from transformers import BertConfig, BertModel

    from embedkit.backbones.processors import tiny_tokenizer

    tok = tiny_tokenizer(["[CLS]", "[SEP]"], pad="[PAD]", eos="[SEP]")
    tok.eos_token = None
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, pad_token_id=tok.pad_token_id), add_pooling_layer=False)
    bert.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    backbone = HFText(seed=0, path=str(tmp_path))
    assert backbone.lora_target.startswith(r"^model\.encoder")
    items = items_for("hf_text")
    batch = last_token(backbone, items)
    for i, item in enumerate(items):
        torch.testing.assert_close(batch[i], last_token(backbone, [item])[0], atol=1e-5, rtol=1e-5)


def test_placeholder_without_image_is_refused():
    for family in ("llava_onevision", "phi3_v"):
        backbone = FAMILIES[family](seed=0, tiny=True)
        with pytest.raises(ValueError, match="no image"):
            backbone.make_processor()([Item(text="<|image_1|> a cat")])


# -- LLaVA-OneVision: AnyRes-Max token counts --------------------------------------------------------


def test_llava_token_count_matches_the_model_for_many_shapes():
    backbone = LlavaOnevision(seed=0, tiny=True)
    proc = backbone.make_processor()
    image_token = backbone.model.config.image_token_id
    for w, h in [(28, 28), (56, 40), (30, 90), (200, 150), (300, 40), (17, 170), (168, 168)]:
        inputs = proc([Item(text="a cat", image=_image(w, h, (9, 9, 9)))])
        with torch.no_grad():  # the model raises if tokens and features disagree
            feats = backbone.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"],
                vision_aspect_ratio=backbone.model.config.vision_aspect_ratio,
            ).pooler_output
        assert int((inputs["input_ids"] == image_token).sum()) == feats[0].shape[0], (w, h)


def test_llava_reference_policy_numbers():
    pins = anyres_pinpoints(384, 6)
    assert len(pins) == 36 and pins[0] == [384, 384] and pins[-1] == [2304, 2304]
    # 384 x 384 image: one tile -> base 27x27 + 27 rows of (27 + newline)
    assert num_image_tokens(384, 384, tile=384, patch=14, pinpoints=pins, anyres_max=9) == 729 + 27 * 28
    # a huge image is capped near anyres_max tiles' worth of features (+ newlines)
    big = num_image_tokens(2304, 2304, tile=384, patch=14, pinpoints=pins, anyres_max=9)
    assert 729 + 9 * 729 * 0.8 < big < 729 + 9 * 729 * 1.21 + 200


def test_llava_resolution_policy_is_configurable():
    small = LlavaOnevision(seed=0, tiny=True, anyres_max=1, max_grid=2)
    proc = small.make_processor()
    assert len(small.model.config.image_grid_pinpoints) == 4
    inputs = proc([Item(image=_image(150, 150, (1, 2, 3)))])
    last_token(small, [Item(image=_image(150, 150, (1, 2, 3)))])  # the model agrees with the count
    default = LlavaOnevision(seed=0, tiny=True).make_processor()([Item(image=_image(150, 150, (1, 2, 3)))])
    assert inputs["input_ids"].shape[1] < default["input_ids"].shape[1]


# -- Phi-3.5-V: HD transform and the official key layout ----------------------------------------------


def test_phi3v_hd_transform_reference_shapes():
    # landscape 2:1 with 4 crops -> 2 x 1 crops (672 x 336); portrait is transposed; 16 crops -> larger
    assert hd_transform(Image.new("RGB", (1000, 500)), 4, 336).size == (672, 336)
    assert hd_transform(Image.new("RGB", (500, 1000)), 4, 336).size == (336, 672)
    assert hd_transform(Image.new("RGB", (800, 800)), 4, 336).size == (672, 672)
    assert hd_transform(Image.new("RGB", (800, 800)), 16, 336).size == (1344, 1344)
    padded = hd_transform(Image.new("RGB", (1000, 300), (0, 0, 0)), 4, 336)
    assert padded.size[1] % 336 == 0 and padded.getpixel((0, 0)) == (255, 255, 255)  # white padding


def test_phi3v_official_token_count():
    from embedkit.backbones.phi3_v import num_image_tokens as phi_tokens

    # reference: (h*w + 1) * 144 + 1 + (h + 1) * 12 for an h x w crop grid (336-px crops)
    assert phi_tokens(2, 2, 12) == 5 * 144 + 1 + 3 * 12 == 757
    assert phi_tokens(1, 1, 12) == 2 * 144 + 1 + 2 * 12


OFFICIAL_PREFIXES = (
    "model.embed_tokens.", "model.layers.", "model.norm.",
    "model.vision_embed_tokens.img_processor.vision_model.",
    "model.vision_embed_tokens.img_projection.0.", "model.vision_embed_tokens.img_projection.2.",
)


def test_phi3v_checkpoint_uses_the_official_key_layout_strictly(tmp_path):
    from safetensors.torch import load_file, save_file

    Phi3V(seed=0, tiny=True).save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    assert {"model.vision_embed_tokens.glb_GN", "model.vision_embed_tokens.sub_GN"} <= set(state)
    odd = [k for k in state if not k.startswith(OFFICIAL_PREFIXES) and not k.endswith(("glb_GN", "sub_GN"))]
    assert odd == []
    assert "model.vision_embed_tokens.img_processor.vision_model.post_layernorm.weight" in state
    assert state["model.vision_embed_tokens.img_projection.0.weight"].shape == (32, 4 * 32)

    # the official file also holds lm_head and the wte alias: both accepted
    extra = dict(state, **{"lm_head.weight": torch.zeros(3, 3),
                           "model.vision_embed_tokens.wte.weight": state["model.embed_tokens.weight"].clone()})
    save_file(extra, str(tmp_path / "model.safetensors"))
    Phi3V(seed=0, path=str(tmp_path))
    # an unknown key or a missing key is refused
    save_file(dict(state, **{"model.extra.weight": torch.zeros(1)}), str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="unexpected"):
        Phi3V(seed=0, path=str(tmp_path))
    state.pop("model.vision_embed_tokens.sub_GN")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="missing"):
        Phi3V(seed=0, path=str(tmp_path))


def test_phi3v_sharded_checkpoint_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    backbone = Phi3V(seed=0, tiny=True)
    backbone.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    items = items_for("phi3_v")
    assert torch.equal(last_token(backbone, items), last_token(Phi3V(seed=1, path=str(tmp_path)), items))


@pytest.mark.parametrize("rope_type", ["su", "longrope"])
def test_phi3v_loads_the_official_long_context_rope_config(tmp_path, rope_type):
    """Phi-3.5-V's config.json carries LongRoPE factors (older files call the type "su")."""
    Phi3V(seed=0, tiny=True).save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    head_half = cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    cfg.update(max_position_embeddings=131072, original_max_position_embeddings=4096, sliding_window=262144,
               rope_scaling={"type": rope_type, "long_factor": [1.5] * head_half, "short_factor": [1.0] * head_half})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = Phi3V(seed=0, path=str(tmp_path))
    assert loaded.language_model.config.rope_parameters["rope_type"] == "longrope"
    assert torch.isfinite(last_token(loaded, items_for("phi3_v"))).all()


def test_phi3v_loads_in_bfloat16_without_a_float32_copy(tmp_path):
    backbone = Phi3V(seed=0, tiny=True)
    backbone.save_pretrained(str(tmp_path))
    loaded = Phi3V(seed=0, path=str(tmp_path), dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    ref = last_token(backbone, items_for("phi3_v"))
    torch.testing.assert_close(last_token(loaded, items_for("phi3_v")).float(), ref, atol=0.15, rtol=0.1)


def test_llava_loads_a_conditional_generation_checkpoint(tmp_path):
    """Hub checkpoints are LlavaOnevisionForConditionalGeneration (with an LM head): the base loads."""
    from transformers import LlavaOnevisionForConditionalGeneration

    backbone = LlavaOnevision(seed=0, tiny=True)
    full = LlavaOnevisionForConditionalGeneration(backbone.model.config)
    full.model.load_state_dict(backbone.model.state_dict())
    full.save_pretrained(str(tmp_path))
    backbone.tokenizer.save_pretrained(str(tmp_path))
    backbone.image_processor.save_pretrained(str(tmp_path))
    loaded = LlavaOnevision(seed=5, path=str(tmp_path))
    items = items_for("llava_onevision")
    assert torch.equal(last_token(backbone, items), last_token(loaded, items))
