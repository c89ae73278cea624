"""Cross-device negatives: 2-process gloo DDP gradients equal the single-process full-batch ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from embedkit.distributed import distributed_loss
from embedkit.losses.base import LossOutput
from embedkit.losses.hardness_weighted import HardnessWeighted

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "helpers" / "scripts" / "ddp_loss_grad.py"


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "result.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


LOSSES = ["infonce", "infonce_bidirectional_learnable", "hardness_weighted", "hardness_weighted_learnable",
          "matryoshka_hardness_weighted", "matryoshka_infonce", "rowless_plugin_style", "multi_vector_infonce"]


@pytest.mark.parametrize("name", LOSSES)
def test_ddp_gradients_equal_single_process(ddp_results, name):
    r = ddp_results[name]
    assert r["grad_scale"] > 1e-3  # there is a gradient to compare
    assert r["grad_max_abs_diff"] < 1e-5, r
    assert r["loss_abs_diff"] < 1e-8, r
    assert r["layout_max_abs_diff"] == 0.0  # gathered Q, P, N are the full batch, in order


MASKED = ["masked_infonce", "masked_infonce_bidirectional_learnable", "masked_hardness_weighted",
          "masked_hardness_weighted_margin", "masked_matryoshka_hardness_weighted",
          "masked_multi_vector_hardness_weighted"]


@pytest.mark.parametrize("name", MASKED)
def test_ddp_masked_loss_and_gradients_equal_single_process_masked(ddp_results, name):
    """Copies of a positive held by the other rank are masked too: the content keys are gathered."""
    r = ddp_results[name]
    assert r["grad_scale"] > 1e-3
    assert r["grad_max_abs_diff"] < 1e-5, r
    assert r["loss_abs_diff"] < 1e-8, r
    assert r["unmasked_loss_abs_diff"] > 1e-3, r  # the planted copies change the loss: the check can fail
    # q2c drops: p0<->p4 both ways, 3 planted negatives (+ whatever the margin adds), summed over ranks
    assert r["masked_negatives"] == r["full_masked_negatives"] >= 5, r


TEACHER = ["distill_infonce", "distill_hardness_weighted", "soft_labels_infonce", "soft_labels_hardness_weighted",
           "masked_distill_hardness_weighted"]


@pytest.mark.parametrize("name", TEACHER)
def test_ddp_teacher_wrappers_equal_single_process(ddp_results, name):
    """distill / soft_labels around InfoNCE and the hardness-weighted loss: the teacher rows gathered like
    the embeddings give the single-process full-batch loss and gradient (masked: the contrastive part)."""
    r = ddp_results[name]
    assert r["grad_scale"] > 1e-3
    assert r["teacher_part"] > 1e-4  # the teacher term is there (mean of the ranks' rows)
    assert r["grad_max_abs_diff"] < 1e-5, r
    assert r["loss_abs_diff"] < 1e-8, r
    if name.startswith("masked_"):
        assert r["unmasked_loss_abs_diff"] > 1e-3 and r["masked_negatives"] == r["full_masked_negatives"] >= 5, r


def test_the_check_catches_a_gather_without_gradients(ddp_results):
    assert ddp_results["detached_gather_bug"]["grad_max_abs_diff"] > 1e-4


def test_rank_rows_and_parts(ddp_results):
    assert ddp_results["infonce"]["rows"] == [0, 3]  # rank 0 owns global rows 0..2
    assert "c2q" in ddp_results["hardness_weighted"]["parts"]
    assert ddp_results["matryoshka_infonce"]["parts"] == ["dim_16", "dim_8"]


def test_not_distributed_is_the_plain_loss():
    g = torch.Generator().manual_seed(0)
    q, p, n = (F.normalize(torch.randn(*s, generator=g), dim=-1) for s in ((4, 8), (4, 8), (4, 2, 8)))
    loss = HardnessWeighted()
    a, b = distributed_loss(loss, q, p, n), loss(q, p, n)
    assert isinstance(a, LossOutput) and torch.equal(a.loss, b.loss)
    seen = []
    distributed_loss(lambda *args, **kw: seen.append((len(args), kw)) or b, q, p, None)
    assert seen == [(3, {})]
