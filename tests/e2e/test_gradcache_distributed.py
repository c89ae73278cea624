"""GradCache under Lightning DDP and FSDP2 (2 gloo CPU processes) equals the single-process full batch.

One launch per strategy of tests/helpers/scripts/gradcache_dist.py (Lightning starts the second process).
The reference encodes every rank's chunks with grad in one graph under the same dropout seeds, so
the comparison is exact with dropout on; clipping is on and below the gradient norm. ``fsdp2_tokens``:
FSDP2 with ``train.chunk_tokens`` and cost-sorted chunks, ranks running different numbers of passes.
``*_video``: a tiny Qwen2-VL, vision tower trainable, rank 0's chunks holding videos and several images,
rank 1's text only (no pixels: the dummy tower pass keeps the collectives matched); ``ddp_video25`` the
same on a tiny Qwen2.5-VL (``qwen2_5_vl``).
"""

import json
import subprocess
import sys

import pytest

from tests.helpers.cli import REPO, cli_env


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "fsdp2_tokens", "ddp_video", "fsdp2_video", "ddp_video25",
                                  "ddp_video3"])
def test_two_process_step_equals_full_batch(mode, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "scripts" / "gradcache_dist.py"), mode, str(out)],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["missing"] == [] and "loss_fn.temperature.log_scale" in result["params"]
    assert result["dropout_active"]
    assert result["sharded"] == mode.startswith("fsdp2")
    if mode == "fsdp2_tokens":  # token budgets: rank 1 ran fewer real passes and padded
        assert result["passes"][0] > result["passes"][1], result
    assert result["grad_diff"] < 1e-5, result
    assert result["rank_diff"] < 1e-6, result  # every rank steps with the same gradient
    assert result["weight_diff"] < 1e-5, result  # clipped SGD step: same weights
