"""A checkpoint is read with PyTorch's weights-only unpickler: one that someone sent, planted with a
payload, is refused by every verb that reads checkpoints with one line, before its code runs;
``trust_checkpoint=true`` reads a trusted legacy file with the full unpickler."""

from __future__ import annotations

import argparse
import pathlib
import tarfile

import pytest
import torch
import yaml

import embedkit
from embedkit import cli
from embedkit.encoder import load_checkpoint_file, read_checkpoint
from embedkit.errors import UserError
from embedkit.runs import RunDir
from tests.export.test_export import TEXTS, trained_run

TEXT_MODEL = ["model.backbone=hf_text", "model.backbone.tiny=true"]


class Payload:
    """Unpickled by the full unpickler, it creates ``target``: code from the file runs."""

    def __init__(self, target: pathlib.Path):
        self.target = target

    def __reduce__(self):
        return pathlib.Path.touch, (self.target,)


def demo_config() -> dict:
    from embedkit.config.loader import compose

    return compose(["recipe=demo"])


@pytest.fixture
def planted(tmp_path):
    """(a run dir whose newest checkpoint carries a payload, that checkpoint, the payload's target)."""
    target = tmp_path / "payload-ran"
    run = RunDir(tmp_path / "sent")
    run.checkpoints_dir.mkdir(parents=True)
    run.write_config(yaml.safe_dump(demo_config(), sort_keys=False))
    torch.save({"state_dict": {}, "hyper_parameters": {"config": demo_config()}, "global_step": 3,
                "extra": Payload(target)}, run.last_checkpoint)
    return run.path, run.last_checkpoint, target


def test_the_planted_payload_really_runs_under_the_full_unpickler(planted):
    _, ckpt, target = planted
    torch.load(ckpt, weights_only=False)
    assert target.exists()  # so the refusals below are worth something


def one_shard_set(root: pathlib.Path) -> pathlib.Path:
    (root / "subset").mkdir(parents=True)
    with tarfile.open(root / "subset" / "shard-000000.tar", "w"):
        pass
    return root


def eval_root(root: pathlib.Path) -> pathlib.Path:
    from tests.helpers import mmeb_fixture

    mmeb_fixture.build(root, rows=4)
    return root


VERBS = {
    "eval": lambda run, ckpt, tmp: ["eval", f"ckpt={ckpt}", f"data.eval.root={eval_root(tmp / 'mmeb')}",
                                    "tracking.enabled=false"],
    "eval model=": lambda run, ckpt, tmp: ["eval", f"model={run}", f"data.eval.root={eval_root(tmp / 'mmeb')}",
                                           "tracking.enabled=false"],
    "export": lambda run, ckpt, tmp: ["export", str(ckpt), f"out={tmp / 'exported'}"],
    "merge": lambda run, ckpt, tmp: ["merge", str(run), str(ckpt), f"out={tmp / 'merged'}"],
    "mine": lambda run, ckpt, tmp: ["mine", f"model={ckpt}", f"shards={one_shard_set(tmp / 'shards')}",
                                    f"out={tmp / 'mined'}", "num_negatives=2"],
    "encode": lambda run, ckpt, tmp: ["encode", f"model={run}", f"input={tmp / 'in.jsonl'}", f"out={tmp / 'o.npy'}"],
    "fit resume=": lambda run, ckpt, tmp: ["fit", f"resume={run}"],
    "fit run.resume=auto": lambda run, ckpt, tmp: ["fit", f"run.dir={run}", "run.resume=auto"],
}


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_refuses_a_planted_checkpoint_in_one_line_before_its_code_runs(verb, planted, tmp_path, capsys):
    run, ckpt, target = planted
    code = cli.main(VERBS[verb](run, ckpt, tmp_path))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("embedkit: error: ckpt: "), err
    assert str(ckpt) in err and "trust_checkpoint=true" in err, err
    assert not target.exists()
    assert not (tmp_path / "exported").exists() and not (tmp_path / "merged").exists()


def test_embedkit_load_refuses_it_too(planted):
    run, ckpt, target = planted
    for path in (ckpt, run):
        with pytest.raises(UserError, match=r"^ckpt: .* holds .*; loading it could run code from the file\. "
                                            r"If you trust the file, add trust_checkpoint=true$"):
            embedkit.load(path)
    assert not target.exists()


def test_a_wrong_trust_value_on_fit_is_one_line(planted, capsys):
    run, _, _ = planted
    assert cli.main(["fit", f"resume={run}", "trust_checkpoint=maybe"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trust_checkpoint: expected true or false, got 'maybe'" in err, err


def test_the_allowlist_holds_what_a_fit_checkpoint_holds(tmp_path):
    """The module's RNG record (python's state tuple, numpy's uint32 array, torch's tensors) reads
    weights-only; a real fit checkpoint is read so by the resume tests (tests/e2e/test_lifecycle.py)."""
    import random

    import numpy as np

    from embedkit.training.module import rng_states

    random.seed(3)
    np.random.seed(3)
    path = tmp_path / "rng.ckpt"
    torch.save({"embedkit": {"rng": [rng_states()]}, "optimizer_states": [{"state": {}, "param_groups": []}]}, path)
    states = load_checkpoint_file(path)["embedkit"]["rng"][0]
    assert states["python"] == random.getstate()
    saved = np.random.get_state()
    assert states["numpy"][0] == saved[0] and np.array_equal(states["numpy"][1], saved[1])


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """A trusted legacy checkpoint: a real model, with an ``argparse.Namespace`` among its hyperparameters
    (as older Lightning code saved them), which the weights-only unpickler does not read."""
    tmp = tmp_path_factory.mktemp("legacy")
    run, module = trained_run(tmp, TEXT_MODEL)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    state["hyper_parameters"]["args"] = argparse.Namespace(lr=1e-4)
    torch.save(state, ckpt)
    return run, ckpt, module


def test_trust_checkpoint_reads_a_trusted_legacy_file(legacy, tmp_path, capsys):
    run, ckpt, module = legacy
    with pytest.raises(UserError, match=r"holds argparse\.Namespace"):
        read_checkpoint(ckpt)
    encoder = embedkit.load(ckpt, trust_checkpoint=True)
    with torch.no_grad():
        ref = module.encoder.encode(texts=TEXTS)
    assert (encoder.encode(texts=TEXTS) - ref).abs().max().item() <= 1e-5
    assert cli.main(["export", str(run), f"out={tmp_path / 'refused'}"]) == 2
    assert cli.main(["export", str(run), f"out={tmp_path / 'exported'}", "trust_checkpoint=true"]) == 0, capsys.readouterr()
    assert (embedkit.load(tmp_path / "exported").encode(texts=TEXTS) - ref).abs().max().item() <= 1e-5
