"""``embedkit fit``'s setup without training: ``check_inputs`` finds the user errors and draws nothing
(the demo data is drawn by ``resolve_shards``, a setup step of ``Fit``); the run dir through ``RunDir``;
the small helpers fit leans on (one config flattening, atomic renames and links, the rank helpers)."""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from embedkit.commands import fit
from embedkit.config.flat import flatten
from embedkit.config.loader import compose
from embedkit.data.datamodule import resolve_shards
from embedkit.distributed.ranks import all_max, is_distributed, max_over_ranks, process_group_up, rank_and_world
from embedkit.errors import UserError
from embedkit.files import link_atomic, move_into_place, temp_path
from embedkit.runs import RunDir
from embedkit.tracking.mlflow_setup import param_value


def _demo(tmp_path, *extra):
    return compose(["recipe=demo", f"run.dir={tmp_path / 'run'}", f"data.demo.cache_dir={tmp_path / 'cache'}",
                    "data.demo.train_size=16", "data.demo.val_size=4", *extra])


def test_check_inputs_draws_no_demo_data_and_resolve_shards_does(tmp_path):
    cfg = _demo(tmp_path)
    checked = fit.check_inputs(cfg)
    assert checked == (None, None)  # both sides left to the demo
    assert not (tmp_path / "cache").exists()  # nothing drawn, nothing written
    lines = []
    train, val = resolve_shards(cfg["data"], log=lines.append, checked=checked)
    assert train and all(p.endswith(".tar") for p in train) and len(val) == 1
    assert (tmp_path / "cache").is_dir() and lines and lines[0].startswith("drawing demo data")


def test_check_inputs_still_refuses_wrong_shards_before_any_drawing(tmp_path):
    cfg = _demo(tmp_path, f"data.train.shards={tmp_path / 'nothing'}")
    with pytest.raises(UserError, match="data.train.shards: no .tar shards found"):
        fit.check_inputs(cfg)
    assert not (tmp_path / "cache").exists()


def test_run_paths_default_to_runs_of_the_name(tmp_path, monkeypatch):
    monkeypatch.delenv(fit.RUN_NAME_ENV, raising=False)
    cfg = compose(["recipe=demo", "run.name=abc"])
    name, run = fit.run_paths(cfg)
    assert name == "abc" and isinstance(run, RunDir) and str(run.path) == "runs/abc"
    with fit.run_name_for_ranks("from-parent"):
        assert fit.run_paths(compose(["recipe=demo"]))[0] == "from-parent"
    assert fit.RUN_NAME_ENV not in os.environ


def test_fit_run_reads_as_its_steps():
    """``Fit.run`` is the list of setup steps, then train and report: short, no complexity waiver."""
    source = inspect.getsource(fit.Fit.run)
    assert len(source.splitlines()) < 40 and "noqa" not in source
    steps = ["_setup_run_dir", "_prepare_shards", "_run_length", "_setup_module", "_setup_data", "_setup_logger",
             "_setup_callbacks", "_setup_trainer", "self.train()", "self.report("]
    at = [source.index(step) for step in steps]
    assert at == sorted(at)  # in this order: the run length is known before the module is built


def test_flatten_keeps_empty_sections_as_leaves():
    tree = {"train": {"lr": 1e-4, "betas": [0.9, 0.99]}, "tracking": {"tags": {}}, "recipe": None}
    flat = flatten(tree)
    assert flat == {"train.lr": 1e-4, "train.betas": [0.9, 0.99], "tracking.tags": {}, "recipe": None}
    assert flatten({"a": {"b": 1}}, "x.") == {"x.a.b": 1}
    assert [param_value(flat[k]) for k in ("tracking.tags", "recipe", "train.lr")] == ["{}", "null", 1e-4]


def test_move_into_place_and_link_atomic(tmp_path):
    target = tmp_path / "step-1.ckpt"
    temp_path(target).write_text("one")
    assert move_into_place(target) == target and target.read_text() == "one"
    assert not temp_path(target).exists()
    last = tmp_path / "last.ckpt"
    last.write_text("old")
    link_atomic(target, last)
    assert last.read_text() == "one" and not temp_path(last).exists()


def test_rank_helpers_outside_a_process_group():
    assert not process_group_up() and rank_and_world() == (0, 1) and not is_distributed()
    assert all_max(7, "cpu") == 7
    t = torch.tensor([3])
    assert max_over_ranks(t) is t and t.item() == 3


# --- one fit per run dir; resume past a cut checkpoint ----------------------------------------------
def _saved_run(tmp_path, steps=(20, 40)) -> RunDir:
    from embedkit.config.loader import to_yaml

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config(to_yaml(_demo(tmp_path)))
    run.checkpoints_dir.mkdir()
    for step in steps:
        torch.save({"global_step": step}, run.step_checkpoint(step))
    link_atomic(run.step_checkpoint(steps[-1]), run.last_checkpoint)
    with open(run.step_checkpoint(steps[-1]), "r+b") as f:  # cut short, as a full disk leaves it
        f.truncate(100)
    return run


def test_resume_and_auto_resume_fall_back_past_a_cut_checkpoint_with_one_warning(tmp_path, capsys, monkeypatch):
    for var in fit.RANK_ENVS:
        monkeypatch.delenv(var, raising=False)
    run = _saved_run(tmp_path)
    _, _, ckpt, _ = fit.compose_run([f"resume={run.path}"])
    assert ckpt == run.step_checkpoint(20)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable checkpoint" in err[0] and str(run.last_checkpoint) in err[0]
    _, _, ckpt, _ = fit.compose_run(["recipe=demo", f"run.dir={run.path}", "run.resume=auto",
                                  f"data.demo.cache_dir={tmp_path / 'cache'}", "data.demo.train_size=16",
                                  "data.demo.val_size=4"])
    assert ckpt == run.step_checkpoint(20) and len(capsys.readouterr().err.strip().splitlines()) == 1
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank the launcher started: the same choice, said once by rank 0
    assert fit.compose_run([f"resume={run.path}"])[2] == run.step_checkpoint(20)
    assert capsys.readouterr().err == ""


def test_a_run_killed_before_its_first_checkpoint_is_continued_from_step_0(tmp_path, capsys, monkeypatch):
    """resume= (and run.resume=auto) on a run dir with its config and no checkpoint: the saved config, no
    checkpoint, the run continued (its MLflow run), one warning; a fresh fit on another dir is not continued."""
    from embedkit.config.loader import to_yaml

    for var in fit.RANK_ENVS:
        monkeypatch.delenv(var, raising=False)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config(to_yaml(_demo(tmp_path)))
    cfg, _, ckpt, continuing = fit.compose_run([f"resume={run.path}", "trainer.max_steps=7"])
    assert ckpt is None and continuing and cfg["run"]["dir"] == str(run.path) and cfg["trainer"]["max_steps"] == 7
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped before its first checkpoint" in err[0] and str(run.path) in err[0]
    demo = ["recipe=demo", f"data.demo.cache_dir={tmp_path / 'cache'}", "data.demo.train_size=16",
            "data.demo.val_size=4"]
    assert fit.compose_run([*demo, f"run.dir={run.path}", "run.resume=auto"])[2:] == (None, True)
    assert fit.compose_run([*demo, f"run.dir={tmp_path / 'other'}", "run.resume=auto"])[2:] == (None, False)


def test_resume_with_no_readable_checkpoint_is_one_line(tmp_path):
    run = _saved_run(tmp_path, steps=(40,))
    with pytest.raises(UserError, match=r"resume=.*: no readable checkpoint under .*step-00000040"):
        fit.compose_run([f"resume={run.path}"])


def test_a_second_fit_on_a_held_run_dir_exits_before_touching_it(tmp_path, monkeypatch):
    for var in fit.RANK_ENVS:
        monkeypatch.delenv(var, raising=False)
    run = RunDir(tmp_path / "run")
    args = ["recipe=demo", f"run.dir={run.path}", f"data.demo.cache_dir={tmp_path / 'cache'}"]
    with run.lock():
        with pytest.raises(UserError, match=rf"run.dir: .* in use by another embedkit fit \(pid {os.getpid()} on "):
            fit.main(args)
        assert run.path.is_dir() and not run.is_run()  # the holder's dir: nothing written, nothing removed
    assert fit.launching_process()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not fit.launching_process()  # ranks the launcher starts run under its lock


def test_the_lock_is_released_when_a_fit_fails(tmp_path, monkeypatch):
    for var in fit.RANK_ENVS:
        monkeypatch.delenv(var, raising=False)

    def fail(self):
        assert RunDir(self.cfg["run"]["dir"]).lock_path.is_file()  # held while the run runs
        raise RuntimeError("boom")

    monkeypatch.setattr(fit.Fit, "run", fail)
    run = RunDir(tmp_path / "run")
    with pytest.raises(RuntimeError):
        fit.main(["recipe=demo", f"run.dir={run.path}", f"data.demo.cache_dir={tmp_path / 'cache'}"])
    assert not run.path.exists()  # a fresh run that failed before its first step leaves nothing
    with run.lock(warn=pytest.fail):
        pass
