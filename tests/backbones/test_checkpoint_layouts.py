"""Checkpoint layouts users have, loaded by ``model.backbone.path``: LLaVA-NeXT ``llava_qwen`` full weights
(Aquila-VL-2B, lmms-lab OneVision, LLaVE) and PEFT LoRA/DoRA adapters (VLM2Vec's releases).

Each test writes a tiny random model in the foreign layout itself, with key names spelled out here as the
authors' code writes them (LLaVA-NeXT ``llava/model/llava_arch.py`` + ``multimodal_encoder/siglip_encoder.py``;
PEFT ``save_pretrained`` of VLM2Vec's ``MMEBModel.encoder``), loads it back and compares embeddings with the
original tiny model's.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from embedkit.backbones.checkpoints.llava_qwen import SIGLIP_MEAN, SIGLIP_STD
from embedkit.backbones.llava_onevision import LlavaOnevision
from embedkit.backbones.phi3_v import Phi3V
from embedkit.backbones.processors import tiny_tokenizer
from embedkit.backbones.qwen2_vl import Qwen2VLBackbone
from embedkit.data.schema import Item
from embedkit.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOL = 1e-6


def _image(w, h, colour):
    img = Image.new("RGB", (w, h), colour)
    for x in range(0, w, 7):
        for y in range(0, h, 5):
            img.putpixel((x, y), ((x * 13) % 256, (y * 7) % 256, 90))
    return img


ITEMS = [
    Item(text="a red circle at the top left"),
    Item(text="<|image_1|> represent the given image", image=_image(56, 40, (200, 30, 30))),
    Item(image=_image(30, 90, (20, 200, 30))),
    Item(text="a photo <|image_1|> of a cat", image=_image(84, 84, (10, 10, 220))),
]


def embed(backbone, items=ITEMS, normalize=False):
    """Last-token states; ``normalize``: L2-normalised, the embeddings embedkit emits."""
    backbone.eval()
    with torch.no_grad():
        out = backbone(backbone.make_processor()(items))
    last = out.hidden[torch.arange(len(items)), out.mask.sum(1) - 1]
    return torch.nn.functional.normalize(last, dim=-1) if normalize else last


def assert_one_line_naming(err, *names):
    text = str(err.value)
    assert "\n" not in text
    for name in names:
        assert name in text, (name, text)


# -- LLaVA-NeXT llava_qwen ---------------------------------------------------------------------------


def llava_qwen_name(key: str) -> str:
    """LlavaOnevisionModel key -> the key LLaVA-NeXT's LlavaQwenForCausalLM saves."""
    for new, old in (("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
                     ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
                     ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
                     ("image_newline", "model.image_newline"), ("language_model.", "model.")):
        if key.startswith(new):
            return old + key[len(new):]
    raise AssertionError(key)


def write_llava_qwen(backbone: LlavaOnevision, root, *, pinpoints="list", tokenizer=None, vocab_rows=None):
    cfg = backbone.model.config
    text, vision = cfg.text_config, cfg.vision_config
    state = {llava_qwen_name(k): v.contiguous() for k, v in backbone.model.state_dict().items()}
    if vocab_rows is not None:
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:vocab_rows].contiguous()
    state["lm_head.weight"] = torch.randn(text.vocab_size, text.hidden_size)
    root.mkdir(parents=True, exist_ok=True)
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"],
        "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers, "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads, "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps, "rope_theta": text.rope_parameters["rope_theta"], "hidden_act": "silu",
        "tie_word_embeddings": False, "use_sliding_window": False,
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": vision.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "spatial_unpad", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints] if pinpoints == "list" else "(1x1),...,(6x6)",
        "embedkit_vision_config": {k: getattr(vision, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "layer_norm_eps", "hidden_act")},
    }
    (root / "config.json").write_text(json.dumps(config))
    (tokenizer or backbone.tokenizer).save_pretrained(str(root))
    return state


@pytest.fixture(scope="module")
def llava():
    backbone = LlavaOnevision(seed=0, tiny=True)
    # llava_qwen checkpoints are normalised as SigLIP is (mean = std = 0.5)
    backbone.image_processor.image_mean, backbone.image_processor.image_std = list(SIGLIP_MEAN), list(SIGLIP_STD)
    return backbone


@pytest.mark.parametrize("pinpoints", ["list", "string"])
def test_llava_qwen_layout_loads_into_llava_onevision(llava, tmp_path, pinpoints):
    state = write_llava_qwen(llava, tmp_path, pinpoints=pinpoints)
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.1.self_attn.q_proj.weight" in state
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.image_newline"} <= set(state)
    loaded = LlavaOnevision(seed=7, path=str(tmp_path))
    assert (embed(loaded) - embed(llava)).abs().max() <= TOL
    assert loaded.model.config.image_grid_pinpoints == llava.model.config.image_grid_pinpoints
    # saved back in the transformers layout, it loads as any llava-hf checkpoint
    loaded.save_pretrained(str(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llava_onevision"
    assert (embed(LlavaOnevision(seed=7, path=str(tmp_path / "hf"))) - embed(llava)).abs().max() <= TOL


def test_llava_qwen_through_the_config_path_key(llava, tmp_path):
    from embedkit.config.loader import compose
    from embedkit.encoder import Encoder

    write_llava_qwen(llava, tmp_path)
    cfg = compose(["recipe=llave_2b", f"model.backbone.path={tmp_path}", "model.backbone.dtype=float32",
                   "model.backbone.gradient_checkpointing=false", "data.train.shards=/nowhere"])
    encoder = Encoder.from_config(cfg["model"], seed=cfg["seed"])
    params = dict(encoder.backbone.model.named_parameters())
    ref = dict(llava.model.named_parameters())
    assert all(torch.equal(params[k], ref[k]) for k in ref)


def test_llava_qwen_strict_keys_one_line_errors(llava, tmp_path):
    state = write_llava_qwen(llava, tmp_path)
    save_file(dict(state, **{"model.mm_projector.4.weight": torch.zeros(2)}), str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as err:
        LlavaOnevision(seed=0, path=str(tmp_path))
    assert_one_line_naming(err, "unmatched", "model.mm_projector.4.weight")
    del state["model.mm_projector.2.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as err:
        LlavaOnevision(seed=0, path=str(tmp_path))
    assert_one_line_naming(err, "missing", "model.mm_projector.2.bias")


def test_llava_qwen_tokenizer_without_image_token_gets_one(llava, tmp_path):
    # LLaVA-NeXT tokenizers have no <image>: the image is the id -200 in its code
    plain = tiny_tokenizer(["<|im_start|>", "\n"], pad="<|endoftext|>", eos="<|im_end|>")
    assert "<image>" not in plain.get_vocab()
    write_llava_qwen(llava, tmp_path, tokenizer=plain)
    loaded = LlavaOnevision(seed=0, path=str(tmp_path))
    ids = loaded.tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    assert ids == [len(plain), len(plain) + 1] and loaded.model.config.image_token_id == ids[0]
    assert torch.isfinite(embed(loaded)).all()
    write_llava_qwen(llava, tmp_path, tokenizer=plain, vocab_rows=len(plain))  # no spare embedding rows
    with pytest.raises(UserError) as err:
        LlavaOnevision(seed=0, path=str(tmp_path))
    assert_one_line_naming(err, "no free embedding row")


def test_llava_qwen_unsupported_projector_is_named(llava, tmp_path):
    write_llava_qwen(llava, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, mm_projector_type="linear")))
    with pytest.raises(UserError) as err:
        LlavaOnevision(seed=0, path=str(tmp_path))
    assert_one_line_naming(err, "mm_projector_type='linear'")


# -- PEFT adapters (VLM2Vec) -------------------------------------------------------------------------


def with_random_adapter(backbone, targets: list[str], seed: int, dora: bool = True, r: int = 4, alpha: int = 64):
    """A copy of ``backbone`` with a random, non-zero (Do)RA adapter on ``targets`` (not merged)."""
    from peft import LoraConfig, inject_adapter_in_model

    adapted = copy.deepcopy(backbone)
    config = LoraConfig(r=r, lora_alpha=alpha, use_dora=dora, init_lora_weights="gaussian",
                        target_modules="^(?:" + "|".join(map(re.escape, targets)) + ")$")
    inject_adapter_in_model(config, adapted)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return adapted


def write_adapter(adapted, root, base, saved_module, *, r=4, alpha=64, dora=True, targets=()):
    """What PEFT's save_pretrained of VLM2Vec's PeftModel writes: ``base_model.model.<base key>.<kind>``."""
    tensors = {}
    for name, t in adapted.state_dict().items():
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_magnitude_vector)\.default\.weight", name)
        if m:
            kind = m[2] + ("" if m[2] == "lora_magnitude_vector" else ".weight")
            tensors[f"base_model.model.{saved_module(m[1])}.{kind}"] = t.contiguous()
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(base), "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.1, "use_dora": dora, "init_lora_weights": "gaussian", "bias": "none",
        "target_modules": sorted(targets), "task_type": None,
    }))
    return tensors


def qwen2vl_saved(name: str) -> str:
    """qwen2_vl backbone module -> VLM2Vec-era (transformers 4.4x) Qwen2VLForConditionalGeneration name."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    assert name.startswith("model.visual.")
    return name[len("model."):]


def phi3v_saved(name: str) -> str:
    """phi3_v backbone module -> official Phi3VForCausalLM name."""
    if name.startswith("vision_tower."):
        return "model.vision_embed_tokens.img_processor.vision_model." + name[len("vision_tower."):]
    assert name.startswith("language_model.")
    return "model." + name[len("language_model."):]


QWEN_TARGETS = ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.self_attn.v_proj",
                "model.language_model.layers.1.mlp.down_proj", "model.visual.blocks.0.attn.qkv"]
PHI_TARGETS = ["language_model.layers.0.self_attn.qkv_proj", "language_model.layers.1.mlp.gate_up_proj",
               "vision_tower.encoder.layers.0.self_attn.q_proj", "vision_tower.encoder.layers.1.self_attn.out_proj"]
CASES = {
    "qwen2_vl": (Qwen2VLBackbone, QWEN_TARGETS, qwen2vl_saved),
    "phi3_v": (Phi3V, PHI_TARGETS, phi3v_saved),
    "llava_onevision": (LlavaOnevision, ["model.language_model.layers.0.self_attn.k_proj",
                                         "model.vision_tower.encoder.layers.0.mlp.fc1"],
                        lambda n: llava_qwen_name(n[len("model."):] + ".weight")[: -len(".weight")]),
}


@pytest.mark.parametrize("dora", [True, False])
@pytest.mark.parametrize("family", list(CASES))
def test_peft_adapter_over_the_base_merges_to_the_adapted_model(family, dora, tmp_path):
    cls, targets, saved = CASES[family]
    base = cls(seed=0, tiny=True)
    if family == "llava_onevision":  # the base in the llava_qwen layout: LLaVE-style checkpoints
        base.image_processor.image_mean, base.image_processor.image_std = list(SIGLIP_MEAN), list(SIGLIP_STD)
        write_llava_qwen(base, tmp_path / "base")
    else:
        base.save_pretrained(str(tmp_path / "base"))
    adapted = with_random_adapter(base, targets, seed=1, dora=dora)
    keys = write_adapter(adapted, tmp_path / "adapter", tmp_path / "base", saved, dora=dora)
    assert all(k.startswith("base_model.model.model.") or k.startswith("base_model.model.visual.") for k in keys)
    loaded = cls(seed=5, path=str(tmp_path / "adapter"))
    assert not any(".lora_" in n or "base_layer" in n for n, _ in loaded.named_parameters())  # merged
    # merged weights vs the adapter's separate matmuls: float32 round-off only (states ~1, embeddings unit)
    assert (embed(loaded) - embed(adapted)).abs().max() <= 1e-5
    want = embed(adapted, normalize=True)
    # not TOL: merging changes the arithmetic (W + BA vs Wx + B(Ax)), and the round-off of the two
    # paths reached 1.01e-6 once under load (thread scheduling changes reduction order)
    assert (embed(loaded, normalize=True) - want).abs().max() <= 5e-6
    assert (embed(base, normalize=True) - want).abs().max() > 1e-3  # the adapter changes the model
    # the vision tower stays frozen after the merge, the language model trains
    frozen = {n for n, p in loaded.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in base.named_parameters() if not p.requires_grad} and frozen


def test_peft_adapter_strict_keys_one_line_errors(tmp_path):
    base = Qwen2VLBackbone(seed=0, tiny=True)
    base.save_pretrained(str(tmp_path / "base"))
    adapted = with_random_adapter(base, QWEN_TARGETS, seed=1)
    keys = write_adapter(adapted, tmp_path / "adapter", tmp_path / "base", qwen2vl_saved)
    file = str(tmp_path / "adapter" / "adapter_model.safetensors")
    # a key of VLM2Vec's own wrapper (not the PeftModel's): names no module of the backbone
    bad = "base_model.model.model.layers.0.self_attn.qq_proj.lora_A.weight"
    save_file(dict(keys, **{bad: torch.zeros(4, 64)}), file)
    with pytest.raises(UserError) as err:
        Qwen2VLBackbone(seed=0, path=str(tmp_path / "adapter"))
    assert_one_line_naming(err, "unmatched", bad)
    gone = "model.language_model.layers.0.self_attn.q_proj.lora_B.default.weight"
    save_file({k: v for k, v in keys.items() if k != "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"}, file)
    with pytest.raises(UserError) as err:
        Qwen2VLBackbone(seed=0, path=str(tmp_path / "adapter"))
    assert_one_line_naming(err, "missing", gone)
    assert load_file(file)  # the folder is still a readable adapter


def test_peft_adapter_over_a_missing_base_is_one_line(tmp_path):
    base = Qwen2VLBackbone(seed=0, tiny=True)
    base.save_pretrained(str(tmp_path / "base"))
    write_adapter(with_random_adapter(base, QWEN_TARGETS, seed=1), tmp_path / "adapter", tmp_path / "gone",
                  qwen2vl_saved)
    with pytest.raises(UserError) as err:
        Phi3V(seed=0, path=str(tmp_path / "adapter"))
    assert_one_line_naming(err, str(tmp_path / "gone"))


def test_eval_a_released_checkpoint_through_the_path_key(llava, tmp_path, monkeypatch):
    """``embedkit eval recipe=llave_2b model.backbone.path=<llava_qwen folder>``: no embedkit checkpoint."""
    from embedkit.cli import main as cli
    from tests.helpers import mmeb_fixture as fx

    root = tmp_path / "mmeb"
    fx.build(root)
    write_llava_qwen(llava, tmp_path / "llave")
    monkeypatch.chdir(tmp_path)
    assert cli(["eval", "recipe=llave_2b", f"model.backbone.path={tmp_path / 'llave'}", "model.backbone.dtype=float32",
                "model.backbone.gradient_checkpointing=false", "data.train.shards=/nowhere", f"data.eval.root={root}",
                "data.eval.datasets=[N24News]", "tracking.enabled=false", "train.chunk_size=8"]) == 0
    score = json.loads((tmp_path / "runs" / "eval-llave_2b" / "N24News_score.json").read_text())
    assert score["num_pred"] == fx.ROWS
