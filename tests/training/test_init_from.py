"""Stages with lineage: ``embedkit fit init_from=RUN`` starts from the parent's weights (LoRA folded, a
fresh adapter on top) with a fresh optimizer; the run records its parent in ``lineage.json`` and MLflow;
merge records its inputs' lineage; the export card shows the chain; misuse is one line."""

from __future__ import annotations

import json

import pytest
import torch

from embedkit.cli import main as cli

SMALL = ["recipe=demo", "data.demo.train_size=48", "data.demo.val_size=8", "data.demo.holdout_combinations=4",
         "train.global_batch_size=8", "train.chunk_size=8", "trainer.max_steps=3", "data.train.num_workers=0",
         "data.train.shuffle_buffer=8", "tracking.enabled=false", "train.warmup=0"]
FROZEN = ["train.lr=0", "trainer.max_steps=1"]  # a stage that changes nothing: its weights are where it started


def weights(run) -> dict[str, torch.Tensor]:
    """The encoder's tensors of a run's last checkpoint (the loss's learnable temperature is the stage's own)."""
    from embedkit.encoder import CHECKPOINT_PREFIX, read_checkpoint

    _, state = read_checkpoint(run / "checkpoints" / "last.ckpt")
    return {k: v for k, v in state["state_dict"].items() if k.startswith(CHECKPOINT_PREFIX)}


def embed(run) -> torch.Tensor:
    import embedkit

    return embedkit.load(run).encode(texts=["a red circle", "a blue square on the left"])


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    try:
        assert cli(["fit", *SMALL, f"run.dir={tmp / 'one'}", "run.name=one"]) == 0
        yield tmp
    finally:
        mp.undo()


def test_a_stage_starts_from_its_parents_weights(stages, capsys):
    from mlflow.tracking import MlflowClient

    from embedkit.tracking.lineage import LINEAGE_TAG, PARENT_TAG

    tmp = stages
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    assert cli(["fit", *SMALL, *FROZEN, f"init_from={tmp / 'one'}", f"run.dir={tmp / 'two'}", "run.name=two",
                "tracking.enabled=true", f"tracking.uri={uri}"]) == 0
    run_id = (tmp / "two" / "mlflow_run_id").read_text().strip()
    tags = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags
    assert tags[PARENT_TAG] == str((tmp / "one").resolve()) and tags[LINEAGE_TAG] == "one -> two"
    capsys.readouterr()
    assert cli(["compare", f"tracking.uri={uri}"]) == 0  # compare shows the chain
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert "lineage" in table[0] and "| one -> two |" in table[2], table
    one, two = weights(tmp / "one"), weights(tmp / "two")
    assert all(torch.equal(one[k], two[k]) for k in one)
    # the parent did train: the seeded initialisation the stage would otherwise have started from differs
    from embedkit.config.loader import compose
    from embedkit.encoder import Encoder

    cfg = compose(SMALL)
    fresh = Encoder.from_config(cfg["model"], seed=cfg["seed"]).state_dict()
    assert not all(torch.equal(one["encoder." + k], v) for k, v in fresh.items())
    lineage = json.loads((tmp / "two" / "lineage.json").read_text())
    assert lineage["how"] == "fit init_from" and lineage["parents"][0]["name"] == "one"
    assert lineage["parents"][0]["step"] == 3


def test_merge_and_export_carry_the_chain(stages):
    from embedkit.tracking.lineage import chain

    tmp = stages
    if not (tmp / "two").exists():
        assert cli(["fit", *SMALL, *FROZEN, f"init_from={tmp / 'one'}", f"run.dir={tmp / 'two'}", "run.name=two"]) == 0
    assert cli(["merge", str(tmp / "two"), str(tmp / "one"), f"out={tmp / 'merged'}"]) == 0
    merged = json.loads((tmp / "merged" / "lineage.json").read_text())
    assert chain(merged) == "(one -> two + one) -> merged"
    assert cli(["export", str(tmp / "merged"), f"out={tmp / 'exp'}"]) == 0
    assert "- lineage: (one -> two + one) -> merged" in (tmp / "exp" / "README.md").read_text()
    # a third stage from the merge's export: its chain reads back through the merge to stage 1
    assert cli(["fit", *SMALL, *FROZEN, f"init_from={tmp / 'exp'}", f"run.dir={tmp / 'three'}",
                "run.name=three"]) == 0
    assert chain(json.loads((tmp / "three" / "lineage.json").read_text())) == "(one -> two + one) -> merged -> three"


def test_misuse_is_one_line(stages, capsys):
    tmp = stages
    assert cli(["fit", *SMALL, f"init_from={tmp / 'nowhere'}", f"run.dir={tmp / 'x'}"]) == 2
    assert capsys.readouterr().err.strip() == f"embedkit: error: init_from: {tmp / 'nowhere'} does not exist"
    assert cli(["fit", *SMALL, "model.backbone.tiny_hidden_size=32", f"init_from={tmp / 'one'}",
                f"run.dir={tmp / 'y'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"embedkit: error: init_from={tmp / 'one'}: model.backbone.tiny_hidden_size differs "
                          "(64 in the parent, 32 here)") and "\n" not in err
    assert not (tmp / "y").exists()
    assert cli(["fit", f"resume={tmp / 'one'}", f"init_from={tmp / 'one'}"]) == 2
    assert "init_from: not with resume=" in capsys.readouterr().err
