"""train.accumulate_steps: one optimizer step over several contrastive batches, through Lightning."""

import importlib.util

import lightning as L
import torch

from tests.helpers.cli import REPO

spec = importlib.util.spec_from_file_location("gradcache_dist", REPO / "tests" / "helpers" / "scripts" / "gradcache_dist.py")
dist_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dist_script)  # registers the tiny "probe" backbone (dropout 0.3)


class TwoBatches(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):  # batch i: the rank-i half of the script's global batch
        qc, cc = dist_script.rank_chunks(i)
        return dist_script.TrainBatch(qc, cc, 4, 1, ["t"] * 4)


class Accumulating(dist_script.EmbeddingModule):
    def on_train_batch_start(self, batch, batch_idx):
        super().on_train_batch_start(batch, batch_idx)
        torch.manual_seed(500 + batch_idx)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(TwoBatches(), batch_size=1, collate_fn=lambda x: x[0])


def test_two_accumulated_batches_make_one_step_of_their_mean_gradient():
    cfg = dist_script.config()
    cfg["train"].update(accumulate_steps=2, clip_grad_norm=None)
    module = Accumulating.from_config(cfg)
    init = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module)
    assert trainer.global_step == 1

    ref = dist_script.EmbeddingModule.from_config(cfg)
    for i in range(2):  # each batch its own contrastive loss, same chunks and dropout seeds, one graph
        qc, cc = dist_script.rank_chunks(i)
        torch.manual_seed(500 + i)
        embs = [ref.encode(c) for c in qc + cc]
        q, c = torch.cat(embs[: len(qc)]), torch.cat(embs[len(qc) :])
        (ref.loss_fn(q, c[:4], c[4:].view(4, 1, -1)).loss / 2).backward()
    for n, p in ref.named_parameters():
        expected = init[n] - dist_script.LR * p.grad
        torch.testing.assert_close(module.state_dict()[n], expected, atol=1e-6, rtol=1e-5, msg=n)
        assert not torch.equal(module.state_dict()[n], init[n]), n
