"""The shared constructor tail (``Backbone.finish_init``, ``one_source``, ``seeded``) on every family.

Tiny random models built from real transformers classes; no downloads.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from embedkit.backbones.hf_text import HFText
from embedkit.backbones.llava_onevision import LlavaOnevision
from embedkit.backbones.phi3_v import Phi3V
from embedkit.backbones.qwen2_vl import Qwen2VLBackbone
from embedkit.backbones.qwen3_vl import Qwen3VLBackbone
from embedkit.config.loader import compose
from embedkit.errors import ConfigError, UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FAMILIES = {"qwen2_vl": Qwen2VLBackbone, "llava_onevision": LlavaOnevision, "phi3_v": Phi3V, "hf_text": HFText}
VLMS = ["qwen2_vl", "llava_onevision", "phi3_v"]

#: every family's ``model.backbone`` keys and defaults: recipes rely on them
COMMON = {"path": None, "tiny": False, "dtype": "float32", "attn_implementation": "sdpa", "attention": "causal",
          "gradient_checkpointing": False}
VISION = {"freeze_vision": True}
KEYS = {
    "qwen2_vl": {**COMMON, **VISION, "min_pixels": 3136, "max_pixels": 1003520, "max_length": 4096,
                 "append_eos": True, "resize": None, "video_min_pixels": None, "video_max_pixels": None,
                 "video_total_pixels": None, "tiny_hidden_size": 64, "tiny_layers": 2, "tiny_vision_layers": 2,
                 "batched_vision_attention": True, "prompt": "none", "system_prompt": "You are a helpful assistant.",
                 "candidate_system_prompt": None, "append_token": None},
    "llava_onevision": {**COMMON, **VISION, "train_projector": False, "append_eos": True, "anyres_max": None,
                        "max_grid": None, "max_length": None, "prompt": "none",
                        "system_prompt": "You are a helpful assistant."},
    "phi3_v": {**COMMON, **VISION, "train_projector": False, "append_eos": True, "num_crops": 4,
               "max_length": None},
    "hf_text": {**COMMON, "append_eos": True, "max_length": 512},
}
# Qwen3-VL (issue 29): pixel caps of Qwen3-VL-Embedding's reference (32 px per token), its prompt keys
FAMILIES["qwen3_vl"] = Qwen3VLBackbone
VLMS.append("qwen3_vl")
KEYS["qwen3_vl"] = {**COMMON, **VISION, "min_pixels": 4096, "max_pixels": 1843200, "max_length": 8192,
                    "append_eos": True, "append_token": None, "prompt": "none",
                    "system_prompt": "Represent the user's input.", "candidate_system_prompt": None, "resize": None, "video_min_pixels": None,
                    "video_max_pixels": None, "video_total_pixels": None, "tiny_hidden_size": 64, "tiny_layers": 2,
                    "tiny_vision_layers": 2}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_keys_and_defaults(family):
    from embedkit.config import registry

    params = registry.get("backbone", family).params
    assert {k: p.default for k, p in params.items()} == KEYS[family]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("source", ["both", "neither"])
def test_path_xor_tiny_is_one_line_error(family, source, tmp_path):
    FAMILIES["hf_text"](seed=0, tiny=True).save_pretrained(str(tmp_path))  # an existing folder
    kwargs = {"path": str(tmp_path), "tiny": True} if source == "both" else {}
    with pytest.raises(UserError) as err:
        FAMILIES[family](seed=0, **kwargs)
    assert str(err.value) == f"model.backbone: {family} needs exactly one of path=<dir or hub id> or tiny=true"


@pytest.mark.parametrize("key", ["freeze_vision", "train_projector"])
def test_hf_text_refuses_vision_keys_in_config(key):
    with pytest.raises(ConfigError) as err:
        compose(["model.backbone.name=hf_text", "model.backbone.tiny=true", f"model.backbone.{key}=false"])
    msg = str(err.value)
    assert msg.startswith(f"model.backbone.{key}:") and "hf_text" in msg and "\n" not in msg
    with pytest.raises(TypeError):
        HFText(seed=0, tiny=True, **{key: False})


def _checkpointed(backbone) -> dict[str, object]:
    """name -> checkpoint function of every module that has a ``gradient_checkpointing`` flag set."""
    return {n: m._gradient_checkpointing_func for n, m in backbone.named_modules()
            if getattr(m, "gradient_checkpointing", False) is True}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_checkpointing_the_same_way_on_every_family(family):
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert not _checkpointed(FAMILIES[family](seed=0, tiny=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # not through the deprecated gradient_checkpointing_enable
        backbone = FAMILIES[family](seed=0, tiny=True, gradient_checkpointing=True)
    models = [m for m in backbone.children() if isinstance(m, PreTrainedModel)]
    assert models and all(m.is_activation_checkpointing for m in models)
    layers = [n for n, m in backbone.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    on = _checkpointed(backbone)
    assert layers and set(layers) <= set(on)  # every layer, language model and vision tower
    assert all(f.keywords == {"use_reentrant": False} for f in on.values())


def _state(backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backbone.state_dict().items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_seeded_tiny_init_is_reproducible_and_leaves_the_callers_rng_alone(family):
    torch.manual_seed(123)
    a = _state(FAMILIES[family](seed=5, tiny=True))
    after_build = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after_build)  # the build drew nothing from the caller's stream
    b = _state(FAMILIES[family](seed=5, tiny=True))
    c = _state(FAMILIES[family](seed=6, tiny=True))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if a[k].is_floating_point() and a[k].numel() > 1 and a[k].std() > 0]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)


def test_seeded_touches_no_accelerator_generator(monkeypatch):
    """``torch.manual_seed`` also reseeds every CUDA device, which ``fork_rng(devices=[])`` would not restore."""
    from embedkit.backbones.base import seeded

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    with seeded(3):
        x = torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(x, torch.rand(2)) and calls == [3]  # only the explicit call above reached CUDA


@pytest.mark.parametrize("family", VLMS)
def test_vision_and_projector_trainability(family):
    cls = FAMILIES[family]
    vision, projector = cls.vision_prefixes, cls.projector_prefixes
    assert vision and (projector or family in ("qwen2_vl", "qwen3_vl"))  # their mergers lie inside model.visual

    def trainable(backbone, prefixes):
        flags = [p.requires_grad for n, p in backbone.named_parameters() if n.startswith(prefixes)]
        assert flags
        return set(flags)

    default = cls(seed=0, tiny=True)
    assert trainable(default, vision) == {False}
    other = {p.requires_grad for n, p in default.named_parameters() if not n.startswith(vision + projector)}
    assert other == {True}
    assert trainable(cls(seed=0, tiny=True, freeze_vision=False), vision) == {True}
    if projector:
        assert trainable(default, projector) == {False}
        with_proj = cls(seed=0, tiny=True, train_projector=True)
        assert trainable(with_proj, projector) == {True} and trainable(with_proj, vision) == {False}
        assert with_proj.train_projector and not default.train_projector


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dtype_tiny_cast_and_loaded_rope_stays_float32(family, tmp_path):
    """A tiny build is cast to ``dtype``; a checkpoint loads in ``dtype`` with its RoPE frequencies kept
    float32, as ``from_pretrained`` leaves them (docs/bugs-and-fixes.md)."""
    tiny = FAMILIES[family](seed=0, tiny=True, dtype="bfloat16")
    assert {p.dtype for p in tiny.parameters()} == {torch.bfloat16}
    assert tiny.training
    FAMILIES[family](seed=0, tiny=True).save_pretrained(str(tmp_path))
    loaded = FAMILIES[family](seed=0, path=str(tmp_path), dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.training
    rope = {n: b.dtype for n, b in loaded.named_buffers() if n.endswith("inv_freq")}
    assert rope and set(rope.values()) == {torch.float32}, rope
