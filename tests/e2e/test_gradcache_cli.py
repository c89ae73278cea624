"""From the command line: one SGD step gives the same weights with and without the cache (2 launches)."""

import torch

from tests.helpers.cli import SMALL_DEMO, run_cli


def _one_step(work, chunk):
    run_dir = work / f"chunk{chunk}"
    out = run_cli(["fit", "recipe=demo", "train.global_batch_size=32", f"train.chunk_size={chunk}",
                   "train.optimizer=sgd", "train.lr=0.5", "train.warmup=0", "trainer.max_steps=1", "seed=0",
                   f"run.dir={run_dir}", "data.val.enabled=false", "tracking.enabled=false", *SMALL_DEMO], cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def test_one_sgd_step_same_weights_chunk_32_and_4(tmp_path):
    whole, cached = _one_step(tmp_path, 32), _one_step(tmp_path, 4)
    assert whole.keys() == cached.keys()
    torch.manual_seed(0)
    from embedkit.config.loader import compose
    from embedkit.training.module import EmbeddingModule

    init = EmbeddingModule.from_config(compose(["recipe=demo", "seed=0"])).state_dict()
    moved = max((whole[k].float() - init[k].float()).abs().max().item() for k in whole)
    assert moved > 1e-4  # the step really changed the weights
    for k in whole:
        torch.testing.assert_close(cached[k], whole[k], atol=1e-5, rtol=0, msg=k)
