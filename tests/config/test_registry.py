"""Components by name, and a user's own component through the plugin mechanism."""

import sys
import textwrap

import pytest
import torch

from embedkit.config import registry
from embedkit.config.loader import compose

PLUGIN = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from embedkit import register
    from embedkit.losses.base import Loss, LossOutput

    @register("loss", "user_margin")
    class UserMargin(Loss):
        def __init__(self, margin: float = 0.3):
            super().__init__()
            self.margin = margin

        def forward(self, q, p, n=None):
            pos = (q * p).sum(-1)
            neg = (q @ p.T).masked_fill(torch.eye(len(q), dtype=torch.bool), -1e4).amax(-1)
            return LossOutput(F.relu(self.margin - pos + neg).mean())
''')


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "user_losses_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_losses_mod"
    registry._registry["loss"].pop("user_margin", None)
    registry._loaded_plugins.discard("user_losses_mod")
    sys.modules.pop("user_losses_mod", None)


def test_builtins_are_registered_by_file_stem():
    assert "infonce" in registry.choices("loss")
    assert "last_token" in registry.choices("pooling")
    assert "qwen2_vl" in registry.choices("backbone")


def test_config_keys_are_constructor_keywords():
    comp = registry.get("loss", "infonce")
    assert set(comp.params) == {"temperature", "learnable_temperature", "bidirectional", "maxsim"}
    assert registry.get("pooling", "last_token").params == {}


def test_plugin_component_is_configured_and_built(plugin_module):
    cfg = compose([f"plugins=[{plugin_module}]", "loss=user_margin", "loss.margin=0.5"])
    assert cfg["loss"] == {"name": "user_margin", "margin": 0.5}
    loss = registry.build("loss", cfg["loss"])
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    assert loss(q, q).loss.item() >= 0 and loss.margin == 0.5


def test_plugin_unknown_without_plugins(plugin_module):
    from embedkit.errors import ConfigError

    with pytest.raises(ConfigError, match="loss.name: unknown loss 'user_margin'"):
        compose(["loss=user_margin"])


def test_missing_plugin_module_is_a_config_error():
    from embedkit.errors import ConfigError

    with pytest.raises(ConfigError, match="plugins: cannot import module 'no_such_mod'"):
        compose(["plugins=[no_such_mod]"])


@pytest.mark.parametrize(
    "kind, block, context, message",
    [
        ("loss", {"name": "hardness_weighted", "alpha": -1.0}, {}, r"^loss\.alpha: must be >= 0, got -1\.0$"),
        ("loss", {"name": "infonce", "temperature": 0.0}, {}, r"^loss\.temperature: must be positive"),
        (
            "loss",
            {"name": "matryoshka", "inner": {"name": "hardness_weighted", "alpha": -1.0}, "dims": [4, 8]},
            {"embedding_dim": 8},
            r"^loss\.inner\.alpha: must be >= 0, got -1\.0$",
        ),
        ("loss", {"name": "matryoshka", "dims": [4, 16]}, {"embedding_dim": 8}, r"^loss\.dims: 16 is larger"),
        (
            "pooling",
            {"name": "latent_attention", "num_heads": 3},
            {"hidden_size": 16},
            r"^model\.pooling\.num_heads: 3 does not divide the hidden size 16$",
        ),
        (
            "pooling",
            {"name": "multi_layer", "num_latents": 0},
            {"hidden_size": 16, "num_layers": 2},
            r"^model\.pooling\.num_latents: must be >= 1",
        ),
    ],
)
def test_build_names_the_full_key_of_a_bad_parameter(kind, block, context, message):
    """A component raises ValueError('<param>: ...'); build() reports it as '<key>.<param>: ...'."""
    from embedkit.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as info:
        registry.build(kind, block, **context)
    assert "\n" not in str(info.value)


def test_build_key_is_explicit_or_from_the_kind_and_other_errors_pass_through():
    from embedkit.errors import ConfigError, UserError

    with pytest.raises(ConfigError, match=r"^eval\.loss\.alpha: "):
        registry.build("loss", {"name": "hardness_weighted", "alpha": -1.0}, key="eval.loss")
    with pytest.raises(ConfigError, match=r"^model\.pooling\.name: unknown pooling 'nope'"):
        registry.build("pooling", {"name": "nope"})

    @registry.register("loss", "_test_raising")
    def raising(what: str = "value"):
        if what == "value":
            raise ValueError("something went wrong")  # names no parameter: the block's key only
        raise UserError("checkpoint missing")  # not a ValueError: untouched

    try:
        with pytest.raises(ConfigError, match=r"^loss: something went wrong$"):
            registry.build("loss", {"name": "_test_raising"})
        with pytest.raises(UserError, match=r"^checkpoint missing$") as info:
            registry.build("loss", {"name": "_test_raising", "what": "user"})
        assert not isinstance(info.value, ConfigError)
    finally:
        registry._registry["loss"].pop("_test_raising", None)
