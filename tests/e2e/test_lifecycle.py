"""Run lifecycle: a SIGTERM-stopped, resumed run equals the uninterrupted one; the non-finite guard;
checks that fail before any model is built and leave no run dir."""

import math
from pathlib import Path

import mlflow
import pytest
import torch

from embedkit.cli import main as cli
from tests.helpers.cli import SMALL_DEMO, run_cli

# a small, fast demo: batch 8 (one task per batch), one forward pass per side
FAST = SMALL_DEMO + ["train.global_batch_size=8", "train.chunk_size=8", "data.train.task_batch_size=8",
                     "data.val.enabled=false",
                     "trainer.log_every_n_steps=1", "trainer.progress=log", "trainer.val_check_interval=null",
                     "train.lr=1e-3"]


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _runs(db: Path):
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, runs


def _losses(client, run) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}


def test_sigterm_then_resume_equals_the_uninterrupted_run(tmp_path):
    steps, stop_after = 60, 23
    common = FAST + [f"trainer.max_steps={steps}", "trainer.checkpoint_every=10", "trainer.log_every_n_steps=3",
                     "data.train.num_workers=2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = run_cli(["fit", *common, f"run.dir={whole}", f"tracking.uri=sqlite:///{tmp_path / 'whole.db'}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    r = run_cli(["fit", *common, f"run.dir={cut}", f"tracking.uri=sqlite:///{tmp_path / 'cut.db'}"], tmp_path,
                EMBEDKIT_TEST_SIGNAL_AFTER_BATCH=str(stop_after))
    assert r.returncode == 143, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"stopped at step {stop_after}; resume with: embedkit fit resume={cut}" in r.stdout
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == [
        "last.ckpt", "step-00000010.ckpt", "step-00000020.ckpt", "step-00000023.ckpt"]
    client, runs = _runs(tmp_path / "cut.db")
    assert [x.info.status for x in runs] == ["KILLED"]

    r = run_cli(["fit", f"resume={cut}", "trainer.progress=none"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _weights(whole), _weights(cut)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6

    client, runs = _runs(tmp_path / "cut.db")
    assert [x.info.status for x in runs] == ["FINISHED"]  # one run, continued
    resumed = _losses(client, runs[0])
    wclient, wruns = _runs(tmp_path / "whole.db")
    expected = _losses(wclient, wruns[0])
    after = {s: v for s, v in expected.items() if s >= stop_after}
    assert len(after) >= (steps - stop_after) // 3
    assert {s: resumed[s] for s in after} == after
    # before the stop too (the stopped run may add a point at its last step, on stopping)
    assert {s: resumed[s] for s in expected} == expected

    # SIGTERM to the whole process group (as `kill -TERM -- -PGID`, `timeout` and SLURM send it), the
    # two DataLoader workers included: they ignore it and the main process stops exactly as above
    group, group_at = tmp_path / "group", 17
    r = _in_own_session(["fit", *common, f"run.dir={group}",
                         f"tracking.uri=sqlite:///{tmp_path / 'group.db'}"], tmp_path,
                        EMBEDKIT_TEST_SIGNAL_GROUP_AFTER_BATCH=str(group_at))
    assert r.returncode == 143, r.stdout[-2000:] + r.stderr[-3000:]
    assert "DataLoader worker" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"stopped at step {group_at}; resume with: embedkit fit resume={group}" in r.stdout
    assert f"step-{group_at:08d}.ckpt" in {p.name for p in (group / "checkpoints").iterdir()}
    r = run_cli(["fit", f"resume={group}", "trainer.progress=none"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    c = _weights(group)
    assert max((a[k].float() - c[k].float()).abs().max().item() for k in a) <= 1e-6


def _in_own_session(args, cwd, **env):
    """``run_cli`` with the CLI leading a process group of its own (the group a signal is sent to)."""
    import subprocess
    import sys

    from tests.helpers.cli import cli_env

    return subprocess.run([sys.executable, "-m", "embedkit", *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=600, start_new_session=True)


def test_resume_refuses_an_override_that_changes_the_math(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    from embedkit.config.loader import compose, to_yaml

    (run / "config.yaml").write_text(to_yaml(compose(["data.train.num_workers=0"])))
    assert cli(["fit", f"resume={run}", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr" in err[0] and "cannot change on resume" in err[0]


def _no_model(monkeypatch):
    from embedkit.encoder import Encoder

    def refuse(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(Encoder, "from_config", classmethod(refuse))


@pytest.mark.parametrize("extra,named", [([], "data.train.shards"),
                                         (["data.train.shards=/nonexistent/shards"], "/nonexistent/shards")])
def test_real_recipe_without_shards_exits_2_before_any_model(tmp_path, monkeypatch, capsys, extra, named):
    _no_model(monkeypatch)
    run = tmp_path / "run"
    assert cli(["fit", "recipe=llave_7b", f"run.dir={run}", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    if not extra:
        assert "embedkit data mmeb" in err[0]
    assert not run.exists()


def test_a_run_that_fails_before_its_first_step_leaves_no_run_dir(tmp_path, monkeypatch):
    from embedkit.encoder import Encoder

    def broken(*a, **k):
        raise OSError("cannot load the model")

    monkeypatch.setattr(Encoder, "from_config", classmethod(broken))
    run = tmp_path / "run"
    with pytest.raises(OSError):
        cli(["fit", *FAST, f"run.dir={run}", "tracking.enabled=false"])
    assert not run.exists()


def _finite(path: Path) -> bool:
    sd = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return all(torch.isfinite(v).all() for v in sd.values())


def test_diverging_run_stops_non_zero_and_leaves_only_finite_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    code = cli(["fit", *FAST, "train.lr=1e6", "train.clip_grad_norm=null", "trainer.max_steps=40",
                "trainer.checkpoint_every=1", "train.max_skipped_steps=3", f"run.dir={run}",
                "tracking.enabled=false", "trainer.progress=none"])
    assert code == 3
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("stopped at step")]
    # here the loss stays finite and the gradients overflow: the line says which it was
    assert len(lines) == 1 and "non-finite" in lines[0] and "train.max_skipped_steps" in lines[0], lines
    assert "last good checkpoint: " + str(run / "checkpoints") in lines[0]
    ckpts = list((run / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(_finite(p) for p in ckpts)


def test_one_injected_non_finite_batch_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    from embedkit.training.module import EmbeddingModule

    real, calls, seen = EmbeddingModule.compute_loss, [0], {}

    def poisoned(self, q, p, n, candidate_keys=None):
        out = real(self, q, p, n, candidate_keys)
        calls[0] += 1
        if calls[0] == 3:  # the third step's loss
            out.loss = out.loss * math.nan
            seen["before"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
            seen["opt_steps"] = self.trainer.global_step
        elif calls[0] == 4:
            seen["after"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
            seen["skipped"] = self.skipped_steps
        return out

    monkeypatch.setattr(EmbeddingModule, "compute_loss", poisoned)
    run = tmp_path / "run"
    assert cli(["fit", *FAST, "trainer.max_steps=6", f"run.dir={run}", "tracking.enabled=false",
                "trainer.progress=none"]) == 0
    assert seen["skipped"] == 1
    # the poisoned step changed no weight (the learnable temperature included)
    assert all(torch.equal(seen["before"][k], seen["after"][k]) for k in seen["before"])
    final = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == 6 and _finite(run / "checkpoints" / "last.ckpt")
    assert final["embedkit"]["skipped_steps"] == 1
