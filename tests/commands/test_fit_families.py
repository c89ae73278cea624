"""End to end: `embedkit fit` on the demo completes for each tiny family (in-process, few steps)."""


import pytest
import torch

from embedkit.cli import main as cli_main

SMALL = ["trainer.max_steps=2", "train.global_batch_size=8", "train.chunk_size=4",
         "data.demo.train_size=128", "data.demo.val_size=8", "data.demo.holdout_combinations=4",
         "data.train.shuffle_buffer=16", "data.train.num_workers=0", "tracking.enabled=false"]
CASES = {
    "llava_onevision": ["model.backbone.name=llava_onevision", "model.backbone.tiny=true"],
    "phi3_v": ["model.backbone.name=phi3_v", "model.backbone.tiny=true", "model.lora.enabled=true"],
    "hf_text": ["model.backbone.name=hf_text", "model.backbone.tiny=true", "data.demo.text_only=true"],
}


@pytest.mark.parametrize("family", list(CASES))
def test_fit_demo_completes(family, tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert cli_main(["fit", "recipe=demo", *CASES[family], *SMALL, f"run.dir={run_dir}"]) == 0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert any(k.startswith("encoder.backbone.") for k in ckpt["state_dict"])
    if family == "phi3_v":  # LoRA run: adapters are in the checkpoint
        assert any("lora_A" in k for k in ckpt["state_dict"])
