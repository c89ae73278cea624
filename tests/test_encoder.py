"""The Encoder outside Lightning, and the rule that every config key is read in one module.

One small demo run (in-process, MMEB validation on the fixture, MLflow on) then an in-process
``embedkit eval`` serve both: the config they compose is wrapped so that every key read records the
module that read it.
"""

from __future__ import annotations

import sys

import pytest
import torch

from embedkit.data.schema import Item  # noqa: E402
from tests.helpers import mmeb_fixture as fx  # noqa: E402

#: modules whose reads do not count: validation and composition read every key by design
GENERIC = ("embedkit.config.",)


class Recorded(dict):
    """A config section that records ``(dotted key, reading module)`` on every ``[]`` and ``get``."""

    def __init__(self, data=(), path: str = "", reads: set | None = None):
        super().__init__()
        self.path, self.reads = path, reads if reads is not None else set()
        for k, v in dict(data).items():
            super().__setitem__(k, Recorded(v, f"{path}{k}.", self.reads) if isinstance(v, dict) and type(v) is dict else v)

    def _note(self, key, depth=2):
        module = sys._getframe(depth).f_globals.get("__name__", "")
        if module.startswith("embedkit.") and not module.startswith(GENERIC):
            self.reads.add((f"{self.path}{key}", module))

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)


def recorded_compose(reads: set):
    from embedkit.config import loader

    real = loader.compose

    def compose(args):
        return Recorded(real(args), "", reads)

    return compose


def leaf_owners(reads: set) -> dict[str, set[str]]:
    """key -> modules that read it; a section read only to reach its keys does not count."""
    keys = {k for k, _ in reads}
    owners: dict[str, set[str]] = {}
    for key, module in reads:
        if any(other.startswith(key + ".") for other in keys):
            continue  # a section (``cfg["train"]``), not a key
        owners.setdefault(key, set()).add(module)
    return owners


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A 4-step demo fit; returns (run dir, the module as it ended, the fit's key reads, eval root)."""
    from embedkit.cli import main as cli
    from embedkit.config import loader
    from embedkit.training.module import EmbeddingModule

    tmp = tmp_path_factory.mktemp("encoder")
    root = tmp / "mmeb"
    fx.build(root, rows=12)
    run_dir = tmp / "runs" / "tiny"
    reads: set = set()
    built = []
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    mp.setattr(loader, "compose", recorded_compose(reads))
    real_build = EmbeddingModule.build.__func__
    mp.setattr(EmbeddingModule, "build",
               classmethod(lambda cls, *a, **k: built.append(real_build(cls, *a, **k)) or built[-1]))
    try:
        assert cli([
            "fit", "recipe=demo", f"run.dir={run_dir}", "run.name=tiny", "data.demo.train_size=64",
            "data.demo.val_size=12", "train.global_batch_size=8", "train.chunk_size=4", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "data.train.num_workers=0", f"data.eval.root={root}",
            "data.eval.datasets=[N24News]", "data.eval.val_rows=4",
        ]) == 0
    finally:
        mp.undo()
    return run_dir, built[0], reads, root


def test_encoder_from_checkpoint_equals_the_trained_module(demo_run):
    from embedkit.encoder import Encoder
    from embedkit.export.reader import from_checkpoint

    run_dir, module, _, _ = demo_run
    module.eval()
    items = [Item(text="a red circle at the top left"), Item(text="a blue square"),
             Item(text="a green cross at the bottom right")]
    from PIL import Image

    items += [Item(image=Image.new("RGB", (56, 56), (200, 30, 30))), Item(image=Image.new("RGB", (56, 56), (30, 30, 200)))]
    with torch.no_grad():
        inputs = module.encoder.processor()(items)
        trained = module.encode(inputs)  # the training path: processed chunk -> the module's forward
    # trust: the fixture's checkpoint pickles its config as this file's ``Recorded`` (not weights-only)
    loaded = from_checkpoint(run_dir / "checkpoints" / "last.ckpt", trust=True)
    assert loaded.provenance.step == 4 and not loaded.training
    got = loaded.encode(items)
    assert got.shape == (len(items), loaded.embedding_dim)
    assert (got - trained).abs().max().item() <= 1e-6
    # an embedding does not depend on what else is in the forward pass
    assert (loaded.encode(items, batch_size=1) - got).abs().max().item() <= 1e-5
    assert (loaded.encode(items, batch_size=2) - got).abs().max().item() <= 1e-5
    # the run changed the weights: an untrained encoder of the same config differs
    config = loaded.provenance.config
    fresh = Encoder.from_config(config["model"], seed=config["seed"]).eval()
    assert (fresh.encode(items) - got).abs().max().item() > 1e-4


def test_encoder_user_errors(tmp_path):
    from embedkit.errors import UserError
    from embedkit.export.reader import from_checkpoint

    with pytest.raises(UserError, match="ckpt: file not found"):
        from_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="not an embedkit checkpoint"):
        from_checkpoint(tmp_path / "other.ckpt")


def test_every_config_key_of_fit_is_read_in_one_module(demo_run):
    _, _, reads, _ = demo_run
    owners = leaf_owners(reads)
    shared = {k: sorted(m) for k, m in owners.items() if len(m) > 1}
    assert not shared, f"keys read in more than one module: {shared}"
    # the recorder sees the builders' reads (it can fail): a sample of keys and their one reader
    assert owners["train.clip_grad_norm"] == {"embedkit.training.module"}
    assert owners["train.accumulate_steps"] == {"embedkit.commands.fit"}  # the module, data and run length need it
    assert owners["train.lr"] == {"embedkit.training.optim"}
    assert owners["data.train.num_negatives"] == {"embedkit.data.datamodule"}
    assert owners["model.normalize"] == {"embedkit.encoder"}
    assert owners["tracking.experiment"] == {"embedkit.tracking.mlflow_setup"}
    assert owners["train.chunk_size"] == {"embedkit.commands.fit"}


def test_every_config_key_of_eval_is_read_in_one_module(demo_run, monkeypatch, capsys):
    from embedkit.cli import main as cli
    from embedkit.config import loader

    run_dir, _, _, root = demo_run
    reads: set = set()
    monkeypatch.chdir(run_dir.parent.parent)
    monkeypatch.setattr(loader, "compose", recorded_compose(reads))
    assert cli(["eval", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"data.eval.root={root}",
                "data.eval.datasets=[N24News]", f"out={run_dir / 'eval'}",
                "trust_checkpoint=true"]) == 0  # its config pickled as ``Recorded`` (demo_run)
    assert "overall P@1" in capsys.readouterr().out
    owners = leaf_owners(reads)
    shared = {k: sorted(m) for k, m in owners.items() if len(m) > 1}
    assert not shared, f"keys read in more than one module: {shared}"
    assert owners["data.eval.root"] == {"embedkit.eval.run"}


def test_the_recorder_reports_a_key_read_in_two_modules():
    reads: set = set()
    cfg = Recorded({"train": {"lr": 1.0}}, "", reads)
    for name in ("embedkit.a", "embedkit.b"):  # two embedkit modules reading the same key
        exec("cfg['train']['lr']", {"__name__": name, "cfg": cfg})
    assert leaf_owners(reads) == {"train.lr": {"embedkit.a", "embedkit.b"}}
