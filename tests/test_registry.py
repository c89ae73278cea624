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
    assert set(comp.params) == {"temperature", "learnable_temperature", "bidirectional"}
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
