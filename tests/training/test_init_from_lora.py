"""``init_from`` a LoRA run: merge-then-new-adapter. The parent's adapter is folded into its base
weights; the new stage trains its own adapter on top and starts exactly at the parent's function."""

from __future__ import annotations

import pytest
import torch

from embedkit.cli import main as cli
from tests.training.test_init_from import FROZEN, SMALL, embed, weights


@pytest.fixture
def stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_lora_parent_is_folded_and_a_new_adapter_trained_on_top(stages):
    tmp = stages
    lora = ["model.lora.enabled=true", "model.lora.r=4", "train.lr=3e-2"]
    assert cli(["fit", *SMALL, *lora, f"run.dir={tmp / 'lora1'}"]) == 0
    assert cli(["fit", *SMALL, "model.lora.enabled=true", "model.lora.r=8", *FROZEN, f"init_from={tmp / 'lora1'}",
                f"run.dir={tmp / 'lora2'}"]) == 0
    assert torch.allclose(embed(tmp / "lora1"), embed(tmp / "lora2"), atol=1e-5)
    assert any("lora_A" in k for k in weights(tmp / "lora2"))  # the new stage's own adapter
