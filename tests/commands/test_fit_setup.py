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
