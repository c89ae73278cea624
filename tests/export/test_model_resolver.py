"""``export.reader.open_model``: the one answer to "which model is this path?", with its Provenance."""

from __future__ import annotations

import shutil

import pytest
import torch

import embedkit
from embedkit.errors import UserError
from embedkit.export.reader import checkpoint_of, open_model
from embedkit.export.writer import export_model
from tests.export.test_export import TEXTS, tiny_text_model, trained_run
from tests.test_architecture import package_graph

MATRYOSHKA_2D = ["model.backbone=hf_text", "model.backbone.tiny=true", "loss=matryoshka_2d", "loss.pairs=[[1,8],[2,16]]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, its export folder) of one tiny 2D-Matryoshka run."""
    tmp = tmp_path_factory.mktemp("resolver")
    run, _ = trained_run(tmp, MATRYOSHKA_2D)
    return run, export_model(run, tmp / "export", log=lambda m: None)


def test_a_checkpoint_a_run_dir_and_its_export_give_one_provenance(trained):
    run, export = trained
    ckpt = run / "checkpoints" / "last.ckpt"
    by_ckpt, p_ckpt = open_model(ckpt)
    by_run, p_run = open_model(run)
    by_export, p_export = open_model(export)
    assert (p_ckpt.kind, p_run.kind, p_export.kind) == ("checkpoint", "run", "export")
    assert p_ckpt.checkpoint == ckpt and p_run.checkpoint == ckpt and p_export.checkpoint is None
    assert (p_run.source, p_export.source) == (run, export)
    assert p_ckpt == p_run == p_export  # the same trained model, whichever way it was opened
    assert p_ckpt.step == 3 and p_ckpt.config["loss"]["name"] == "matryoshka_2d"
    assert p_ckpt.dims == [32, 16, 8] and p_ckpt.pairs == [(1, 8), (2, 16), (2, 32)]
    assert all(m.provenance is p for m, p in ((by_ckpt, p_ckpt), (by_run, p_run), (by_export, p_export)))
    assert not by_export.training
    assert (by_ckpt.encode(texts=TEXTS) - by_export.encode(texts=TEXTS)).abs().max().item() <= 1e-5
    assert checkpoint_of(run) == ckpt == checkpoint_of(ckpt)


def test_a_sentence_transformers_folder_is_scored_but_not_loaded(trained, tmp_path):
    _, export = trained
    st_folder = tmp_path / "st"
    shutil.copytree(export, st_folder)
    (st_folder / "embedkit.json").unlink()
    model, provenance = open_model(st_folder)
    assert provenance.kind == "sentence_transformers" and provenance.source == st_folder
    assert provenance.config == {} and provenance.step == 0
    assert model.provenance is provenance and hasattr(model, "encode_items")
    from embedkit.data.schema import Item

    items = [Item("a red square"), Item("a blue circle")]  # eval encodes a corpus with side="candidate"
    assert torch.equal(model.encode_items(items, 2, side="candidate"), model.encode_items(items, 2))
    with pytest.raises(UserError, match=r"^model: .* is a sentence-transformers folder \(modules.json\); give "):
        embedkit.load(st_folder)


def test_a_recipe_with_model_backbone_path_builds_the_released_weights(tmp_path):
    from embedkit.config.loader import compose

    base = tiny_text_model("llama", tmp_path / "base")
    cfg = compose(["recipe=demo", "model.backbone=hf_text", f"model.backbone.path={base}"])
    model, provenance = open_model(None, recipe=cfg)
    assert provenance.kind == "config" and provenance.source == base
    assert provenance.config == {} and provenance.dims is None and not model.training
    with pytest.raises(UserError, match="^ckpt: give a checkpoint file$"):
        open_model(None, recipe=cfg, what="ckpt", kinds=("checkpoint",))


def test_what_is_not_a_model_is_one_line_naming_the_option(tmp_path):
    cases = [
        (lambda: open_model(tmp_path / "missing"), rf"^model: {tmp_path / 'missing'} does not exist$"),
        (lambda: open_model(tmp_path / "missing.ckpt", what="ckpt", kinds=("checkpoint",)), "^ckpt: file not found: "),
        (lambda: open_model(tmp_path), r"^model: .* holds no model: it is neither an embedkit export"),
        (lambda: checkpoint_of(tmp_path, what="merge"), "^merge: .* holds no model"),
    ]
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "empty-run" / "config.yaml").write_text("seed: 0\n")
    cases.append((lambda: open_model(tmp_path / "empty-run"), r"^model: .*empty-run is not a run dir with a checkpoint"))
    for call, message in cases:
        with pytest.raises(UserError, match=message) as exc:
            call()
        assert "\n" not in str(exc.value)


def test_export_refuses_what_is_not_a_run(trained, tmp_path):
    _, export = trained
    with pytest.raises(UserError, match=r"^export: .* is an embedkit export \(embedkit.json\); give a checkpoint file "
                                        "or a run dir$"):
        export_model(export, tmp_path / "again", log=lambda m: None)


def test_losses_declare_the_sizes_they_train():
    from embedkit.losses.trained_sizes import trained_sizes

    assert trained_sizes({"name": "infonce"}, 2, 32) == (None, None)
    assert trained_sizes({"name": "not_a_loss"}, 2, 32) == (None, None)
    assert trained_sizes(None, 2, 32) == (None, None)
    assert trained_sizes({"name": "matryoshka", "dims": [8, 32]}, 2, 32) == ([32, 8], None)
    assert trained_sizes({"name": "matryoshka"}, 2, 32) == ([32, 16, 8, 4], None)
    assert trained_sizes({"name": "matryoshka_2d", "mode": "sample"}, 2, 32)[1] is None
    assert trained_sizes({"name": "matryoshka_2d", "pairs": [[1, 8]]}, 2, 32) == ([32, 8], [(1, 8), (2, 32)])


def test_the_encoder_knows_no_loss():
    """The Matryoshka sizes come from the losses through the resolver; the encoder only holds them."""
    assert "losses" not in package_graph().get("encoder", {}), package_graph()["encoder"]["losses"]
