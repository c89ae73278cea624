"""End to end: every loss x pooling head trains 3 demo steps through ``embedkit fit``; a user's loss
from a plugin module runs from the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embedkit.commands import fit
from embedkit.config import registry
from embedkit.encoder import load_checkpoint_file
from embedkit.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
LOSSES = {
    "infonce": ["loss=infonce", "loss.bidirectional=true"],
    "hardness_weighted": ["loss=hardness_weighted"],
    "matryoshka": ["loss=matryoshka", "loss.inner=hardness_weighted", "loss.dims=[16,32,64]"],
    "matryoshka_2d": ["loss=matryoshka_2d", "loss.mode=sample"],
}
POOLINGS = ["last_token", "mean", "latent_attention", "multi_layer", "multi_vector"]
#: a head that pools across layers cannot give per-layer embeddings: refused with one line
REFUSED = {("matryoshka_2d", "multi_layer")}


def tiny_run(tmp: Path, cache: Path) -> list[str]:
    return [
        "recipe=demo", "trainer.max_steps=3", f"run.dir={tmp}", "tracking.enabled=false",
        "trainer.progress=none", "data.val.enabled=false", "data.train.num_workers=0",
        "data.demo.train_size=48", "data.demo.val_size=8", f"data.demo.cache_dir={cache}",
        "train.global_batch_size=4", "train.chunk_size=2",  # two chunks: GradCache is exercised
    ]


#: losses that need teacher data in the shards (``embedkit teach``): trained end to end in
#: tests/e2e/test_teach_cli.py, on taught shards
TEACHER_LOSSES = {"distill", "soft_labels"}


def test_every_builtin_is_covered():
    assert set(LOSSES) | TEACHER_LOSSES == set(registry.choices("loss"))
    assert set(POOLINGS) == set(registry.choices("pooling"))


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_loss_and_pooling_train_three_steps(loss, pooling, tmp_path, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "demo-cache"
    args = tiny_run(tmp_path / "run", cache) + LOSSES[loss] + [f"model.pooling={pooling}"]
    if (loss, pooling) in REFUSED:
        with pytest.raises(UserError, match="model.pooling: multi_layer pools across layers"):
            fit.main(args)
        return
    assert fit.main(args) == 0
    # weights-only, as every verb reads it: the allowlist covers each loss and head's checkpoint
    ckpt = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    state = ckpt["state_dict"]
    if pooling in ("latent_attention", "multi_layer"):  # the head's trained parameters are saved
        assert any(k.startswith("encoder.pooling.") for k in state)
    assert ckpt["hyper_parameters"]["config"]["loss"]["name"] == loss


def test_plugin_loss_runs_from_the_command_line(tmp_path):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "my_user_losses.py").write_text(textwrap.dedent('''
        import torch
        import torch.nn.functional as F
        from embedkit import register
        from embedkit.losses.base import Loss, LossOutput, candidates

        @register("loss", "my_margin_loss")
        class MyMarginLoss(Loss):
            """A user's loss written as loss(q, p, n) only."""
            def __init__(self, scale: float = 20.0):
                super().__init__()
                self.scale = scale

            def forward(self, q, p, n=None):
                logits = self.scale * (q @ candidates(p, n).T)
                print("MY_MARGIN_LOSS_CALLED", flush=True)
                return LossOutput(F.cross_entropy(logits, torch.arange(q.shape[0])), {"mine": logits.mean().detach()})
    '''))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(plugin_dir)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    args = tiny_run(tmp_path / "run", tmp_path / "cache") + [
        "plugins=[my_user_losses]", "loss=my_margin_loss", "loss.scale=10", "model.pooling=mean"]
    proc = subprocess.run([sys.executable, "-m", "embedkit", "fit", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MY_MARGIN_LOSS_CALLED" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    # a bad key of the user's loss is a one-line config error naming it
    bad = subprocess.run([sys.executable, "-m", "embedkit", "config", "show", "plugins=[my_user_losses]",
                          "loss=my_margin_loss", "loss.scal=3"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "loss.scal: unknown key of loss 'my_margin_loss'" in bad.stderr


def test_matryoshka_dims_larger_than_the_embedding_exit_2_naming_the_key(tmp_path, capsys):
    from embedkit import cli

    args = tiny_run(tmp_path / "run", tmp_path / "cache") + ["loss=matryoshka", "loss.dims=[32,4096]"]
    assert cli.main(["fit", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "loss.dims: 4096 is larger than the embedding (64 dimensions)" in err
