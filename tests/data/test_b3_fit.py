"""``data.train.batching=b3`` through ``embedkit fit`` (in process): a finished small demo run is the
teacher; the partition lands in the run dir and the cache; a second run takes it from the cache, a
resume from its run dir; the batches the stream draws are the partition's; misuse is one line."""

from __future__ import annotations

import json

import pytest

from embedkit.cli import main as cli

SMALL = ["data.demo.train_size=64", "data.demo.val_size=8", "data.demo.holdout_combinations=4",
         "train.global_batch_size=8", "train.chunk_size=8", "trainer.max_steps=2", "data.train.num_workers=0",
         "data.train.shuffle_buffer=8", "tracking.enabled=false"]
B3 = ["data.train.batching=b3", "data.train.b3.window=[1,6]", "data.train.b3.cluster_size=8",
      "data.train.b3.batch_size=16"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("b3fit")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)
    mp.setenv("EMBEDKIT_CACHE", str(tmp / "cache"))
    try:
        assert cli(["fit", "recipe=demo", f"run.dir={tmp / 'teacher'}", *SMALL]) == 0
        yield tmp
    finally:
        mp.undo()


def test_a_b3_run_ranks_once_then_reads_the_cache_and_its_run_dir(teacher, capsys):
    tmp = teacher
    words = ["fit", "recipe=demo", *SMALL, *B3, f"data.train.b3.teacher={tmp / 'teacher'}"]
    assert cli([*words, f"run.dir={tmp / 'one'}"]) == 0
    out = capsys.readouterr().out
    assert "b3: ranking 64 examples with the teacher" in out and "b3: preference graph: 64 examples" in out
    saved = json.loads((tmp / "one" / "b3_partition.json").read_text())
    assert sorted(i for c in saved["clusters"] for i in c) == list(range(64))
    cached = list((tmp / "cache" / "b3").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == saved

    assert cli([*words, f"run.dir={tmp / 'two'}"]) == 0
    assert "b3: partition from the cache" in capsys.readouterr().out

    assert cli(["fit", f"resume={tmp / 'one'}", "trainer.max_steps=3"]) == 0
    assert f"b3: partition from {tmp / 'one' / 'b3_partition.json'}" in capsys.readouterr().out
    assert json.loads((tmp / "one" / "b3_partition.json").read_text()) == saved


def test_a_missing_teacher_is_one_line_before_anything_is_built(teacher, capsys):
    tmp = teacher
    assert cli(["fit", "recipe=demo", *SMALL, *B3, f"data.train.b3.teacher={tmp / 'nowhere'}",
                f"run.dir={tmp / 'x'}"]) == 2
    err = capsys.readouterr()
    assert err.err.strip() == f"embedkit: error: data.train.b3.teacher: {tmp / 'nowhere'} does not exist"
    assert "b3:" not in err.out and not (tmp / "x").exists()


def test_a_teacher_that_is_no_model_is_one_line(teacher, capsys):
    tmp = teacher
    (tmp / "empty").mkdir()
    assert cli(["fit", "recipe=demo", *SMALL, *B3, f"data.train.b3.teacher={tmp / 'empty'}",
                f"run.dir={tmp / 'y'}"]) == 2
    assert capsys.readouterr().err.startswith(f"embedkit: error: data.train.b3.teacher: {tmp / 'empty'} holds no model")
    assert not (tmp / "y").exists()


def test_the_b3_recipes_tiny_form_trains_two_steps(teacher, capsys):
    """recipes/b3_qwen2vl_2b.yaml with a tiny random Qwen2-VL on the demo data: the line of its header."""
    tmp = teacher
    assert cli(["fit", "recipe=b3_qwen2vl_2b", "model.backbone.tiny=true", "~model.backbone.path",
                "data.demo.enabled=true", f"data.train.b3.teacher={tmp / 'teacher'}", "data.train.b3.window=[1,8]",
                "data.train.b3.cluster_size=8", "data.demo.train_size=64", "data.demo.val_size=8",
                "data.demo.holdout_combinations=4", "train.global_batch_size=8", "data.train.task_batch_size=8",
                "train.chunk_size=4", "trainer.max_steps=2", "model.backbone.min_pixels=3136",
                "model.backbone.max_pixels=3136", "data.train.num_workers=0", "tracking.enabled=false",
                f"run.dir={tmp / 'recipe'}"]) == 0
    out = capsys.readouterr().out
    assert "step 2/2" in out and (tmp / "recipe" / "b3_partition.json").is_file()
