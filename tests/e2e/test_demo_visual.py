"""End to end: ``embedkit fit recipe=demo_video`` and ``recipe=demo_docs`` draw their data, train a few
steps and print their held-out metric before and after (tiny sizes; the figures are in docs/demos.md)."""

from __future__ import annotations

import re

import pytest

from embedkit.commands import fit
from embedkit.encoder import load_checkpoint_file

TINY = ["trainer.max_steps=2", "trainer.val_check_interval=2", "tracking.enabled=false", "trainer.progress=none",
        "data.train.num_workers=0", "data.demo.train_size=16", "train.global_batch_size=4", "train.chunk_size=4"]
CASES = {
    "demo_video": (["data.demo.val_size=8", "data.demo.image_size=32", "data.demo.num_frames=2",
                    "data.video.num_frames=2", "model.backbone.min_pixels=784", "model.backbone.max_pixels=1024"],
                   "text-to-video R@1"),
    "demo_docs": (["data.demo.val_size=8", "data.demo.image_size=56", "model.backbone.min_pixels=3136",
                   "model.backbone.max_pixels=3136"], "NDCG@5"),
}


@pytest.mark.parametrize("recipe", list(CASES))
def test_visual_demo_trains_and_reports_its_held_out_metric(recipe, tmp_path, capsys):
    extra, label = CASES[recipe]
    run = tmp_path / "run"
    args = [f"recipe={recipe}", f"run.dir={run}", f"data.demo.cache_dir={tmp_path / 'cache'}", *TINY, *extra]
    assert fit.main(args) == 0
    out = capsys.readouterr().out
    line = re.search(rf"held-out {re.escape(label)} \(8 queries, each against 8 candidates\): "
                     r"before ([0-9.]+) -> after ([0-9.]+)", out)
    assert line, out  # printed only when validation logged the metric the data names (val/t2v_r@1, val/ndcg@5)
    assert all(0.0 <= float(v) <= 1.0 for v in line.groups())
    assert (tmp_path / "cache" / recipe).is_dir()
    assert load_checkpoint_file(run / "checkpoints" / "last.ckpt")["global_step"] == 2
