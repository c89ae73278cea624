"""apply_lora: exact adapted modules per family, what trains, DoRA, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from embedkit.backbones.hf_text import HFText
from embedkit.backbones.llava_onevision import LlavaOnevision
from embedkit.backbones.lora import adapted_module_names, apply_lora
from embedkit.backbones.phi3_v import Phi3V
from embedkit.data.schema import Item
from embedkit.errors import ConfigError

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "dora": False, "target": None}
DECODER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PHI3 = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
#: family -> (class, expected adapted module names on the tiny model: 2 language-model layers)
EXPECTED = {
    "llava_onevision": (LlavaOnevision, {f"model.language_model.layers.{i}.{m}" for i in range(2) for m in DECODER}),
    "phi3_v": (Phi3V, {f"language_model.layers.{i}.{m}" for i in range(2) for m in PHI3}),
    "hf_text": (HFText, {f"model.layers.{i}.{m}" for i in range(2) for m in DECODER}),
}


def _items(family):
    items = [Item(text="a red circle at the top left"), Item(text="a blue square")]
    if family != "hf_text":
        items.append(Item(text="<|image_1|> a picture", image=Image.new("RGB", (40, 56), (200, 10, 10))))
    return items


def _embed(backbone, inputs):
    out = backbone(inputs)
    return out.hidden[torch.arange(out.hidden.shape[0]), out.mask.sum(1) - 1]


@pytest.mark.parametrize("family", list(EXPECTED))
def test_exact_adapted_modules_and_trainable_set(family):
    cls, expected = EXPECTED[family]
    backbone = cls(seed=0, tiny=True)
    inputs = backbone.make_processor()(_items(family))
    with torch.no_grad():
        before = _embed(backbone, inputs)
    apply_lora(backbone, LORA)
    assert adapted_module_names(backbone) == expected
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.rsplit(".lora_", 1)[0] for n in trainable} == expected
    with torch.no_grad():  # LoRA B starts at zero: the model is unchanged
        torch.testing.assert_close(_embed(backbone, inputs), before)


@pytest.mark.parametrize("family", ["llava_onevision", "phi3_v"])
def test_train_projector_and_frozen_vision(family):
    cls = EXPECTED[family][0]
    full = cls(seed=0, tiny=True)  # full fine-tuning: vision and projector frozen by default
    vision = tuple(full.vision_prefixes)
    projector = tuple(full.projector_prefixes)
    names = dict(full.named_parameters())
    assert not any(p.requires_grad for n, p in names.items() if n.startswith(vision + projector))
    assert all(p.requires_grad for n, p in names.items() if not n.startswith(vision + projector))
    with_proj = apply_lora(cls(seed=0, tiny=True, train_projector=True), LORA)
    trainable = {n for n, p in with_proj.named_parameters() if p.requires_grad}
    assert any(n.startswith(projector) for n in trainable)
    assert not any(n.startswith(vision) for n in trainable)
    unfrozen = cls(seed=0, tiny=True, freeze_vision=False)
    assert all(p.requires_grad for n, p in unfrozen.named_parameters() if n.startswith(vision))


@pytest.mark.parametrize("family", list(EXPECTED))
def test_dora_and_gradient_checkpointing_backward(family):
    cls, expected = EXPECTED[family]
    backbone = apply_lora(cls(seed=0, tiny=True, gradient_checkpointing=True), dict(LORA, dora=True, dropout=0.1))
    assert all(hasattr(m, "lora_magnitude_vector") for n, m in backbone.named_modules() if n in expected)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in backbone.modules())
    backbone.train()
    inputs = backbone.make_processor()(_items(family))
    _embed(backbone, inputs).pow(2).sum().backward()
    grads = {n: p.grad for n, p in backbone.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # lora_B starts at zero, so lora_A's first gradient is zero; B and the DoRA magnitudes get signal
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n or "magnitude" in n)


def test_disabled_is_full_fine_tuning_and_bad_targets_are_refused():
    backbone = HFText(seed=0, tiny=True)
    assert apply_lora(backbone, dict(LORA, enabled=False)) is backbone
    assert adapted_module_names(backbone) == set()
    with pytest.raises(ConfigError, match="matches no module"):
        apply_lora(HFText(seed=0, tiny=True), dict(LORA, target=r"^nothing$"))
    with pytest.raises(ConfigError, match="vision-tower"):
        apply_lora(Phi3V(seed=0, tiny=True), dict(LORA, target=r"^vision_tower\..*\.q_proj$"))
    custom = apply_lora(HFText(seed=0, tiny=True), dict(LORA, target=r"^model\.layers\.1\.self_attn\.v_proj$"))
    assert adapted_module_names(custom) == {"model.layers.1.self_attn.v_proj"}
