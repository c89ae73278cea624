"""A model cut to a depth and an embedding size (2D Matryoshka / Starbucks, arXiv 2402.14776,
2410.13230: a model trained at several depths and sizes is served at any of them): ``Encoder.cut``,
``embedkit.load(path, layer=, dim=)``, ``embedkit export ... layer= dim=`` and ``embedkit eval ... layer= dim=``.

A cut model drops the layers above ``layer`` (fewer parameters, less work) and gives exactly the
embeddings the full model's ``encode(layer=, dim=)`` gives, which are the (layer, dim) sub-model's of
2D Matryoshka training (``Encoder.layer_embeddings``).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import embedkit
from embedkit.errors import UserError
from embedkit.export.writer import export_model
from tests.export.test_export import FAMILIES, items_for, trained_run
from tests.helpers import mmeb_fixture as fx  # noqa: E402
from tests.helpers.models import tiny_encoder


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_cut_model_gives_the_embeddings_of_encode_at_that_layer(family):
    encoder = tiny_encoder(family, *(["model.backbone.tiny_layers=3"] if family == "qwen2_vl" else []))
    items, depth = items_for(family), encoder.backbone.num_layers
    for layer in range(1, depth):
        ref = encoder.encode_items(items, batch_size=3, layer=layer)
        assert (ref - encoder.encode_items(items, batch_size=3)).abs().max().item() > 1e-3  # a different model
        with torch.no_grad():  # the sub-model 2D Matryoshka trains: layer_embeddings' entry
            trained = encoder.layer_embeddings(encoder.processor()(items))[:, layer - 1]
        torch.testing.assert_close(ref, trained, atol=1e-6, rtol=0)
        cut = copy.deepcopy(encoder).cut(layer=layer)
        assert cut.backbone.num_layers == layer
        assert n_params(cut) < n_params(encoder)  # the layers above are gone, not skipped
        assert (cut.encode_items(items, batch_size=3) - ref).abs().max().item() <= 1e-6
        small = copy.deepcopy(encoder).cut(layer=layer, dim=16)
        expected = torch.nn.functional.normalize(ref[:, :16], dim=-1)
        assert (small.encode_items(items, batch_size=3) - expected).abs().max().item() <= 1e-6
        assert small.embedding_dim == 16
        # a cut model's own encode(dim=) goes on from the cut
        smaller = small.encode_items(items, batch_size=3, dim=8)
        assert (smaller - torch.nn.functional.normalize(ref[:, :8], dim=-1)).abs().max().item() <= 1e-6
    # cutting to the full depth changes nothing: the final norm stays
    same = copy.deepcopy(encoder).cut(layer=depth)
    assert n_params(same) == n_params(encoder)
    assert (same.encode_items(items) - encoder.encode_items(items)).abs().max().item() == 0


def test_cut_errors_are_one_line():
    encoder = tiny_encoder("hf_text")
    depth, dim = encoder.backbone.num_layers, encoder.embedding_dim
    for kwargs, msg in (({"layer": 0}, f"layer: must be between 1 and {depth}"),
                        ({"layer": depth + 1}, f"layer: must be between 1 and {depth}"),
                        ({"dim": dim + 1}, f"dim: must be between 1 and {dim}"),
                        ({"dim": 0}, f"dim: must be between 1 and {dim}")):
        with pytest.raises(UserError, match=msg):
            copy.deepcopy(encoder).cut(**kwargs)
        with pytest.raises(UserError, match=msg):  # encode checks the same way
            encoder.encode(["a red circle"], **kwargs)
    # as a Matryoshka-trained model records them
    encoder.provenance = dataclasses.replace(encoder.provenance, dims=[dim, dim // 2, dim // 4])
    with pytest.raises(UserError, match=rf"dim: 5 is not a dim this model was trained for; its Matryoshka dims: {dim}, "):
        copy.deepcopy(encoder).cut(dim=5)
    copy.deepcopy(encoder).cut(dim=dim // 4)  # a trained dim is accepted
    multi = tiny_encoder("hf_text", "model.pooling=multi_layer")
    with pytest.raises(UserError, match=r"^layer: the MultiLayer\w* head pools across all layers"):
        multi.cut(layer=1)


def test_a_pair_2d_training_did_not_train_is_warned_about(tmp_path):
    run, _ = trained_run(tmp_path, ["model.backbone.name=hf_text", "model.backbone.tiny=true",
                                    "loss=matryoshka_2d", "loss.pairs=[[1,8],[2,16]]"])
    encoder = embedkit.load(run)
    assert encoder.provenance.pairs == [(1, 8), (2, 16), (2, 32)] and encoder.provenance.dims == [32, 16, 8]
    with pytest.warns(UserWarning, match=r"layer=1 dim=16: not a \(layer, dim\) pair this model was trained for"):
        embedkit.load(run, layer=1, dim=16)
    with pytest.raises(UserError, match="dim: 4 is not a dim this model was trained for"):
        embedkit.load(run, dim=4)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert embedkit.load(run, layer=1, dim=8).backbone.num_layers == 1


@pytest.mark.parametrize("family,merge", [("hf_text", True), ("qwen2_vl", True), ("hf_text", False)])
def test_load_and_export_at_a_depth_reproduce_encode_at_that_depth(family, merge, tmp_path):
    extra = ["model.lora.enabled=true"] if not merge else []
    run, module = trained_run(tmp_path, [f"model.backbone.name={family}", "model.backbone.tiny=true",
                                         "loss=matryoshka_2d", "loss.mode=sample", *extra])
    full = module.encoder
    items, dim = items_for(family), full.embedding_dim // 4
    ref = full.encode_items(items, batch_size=4, layer=1, dim=dim)
    loaded = embedkit.load(run, layer=1, dim=dim)
    assert loaded.backbone.num_layers == 1 and n_params(loaded) < n_params(full)
    assert (loaded.encode_items(items, batch_size=4) - ref).abs().max().item() <= 1e-6
    whole = export_model(run, tmp_path / "whole", merge_lora=merge, log=lambda m: None)
    out = export_model(run, tmp_path / "cut", merge_lora=merge, layer=1, dim=dim, log=lambda m: None)
    meta = json.loads((out / "embedkit.json").read_text())
    assert (meta["layer"], meta["num_layers"], meta["final_norm"], meta["dim"]) == (1, 2, False, dim)
    config = json.loads((out / "config.json").read_text())
    assert (config.get("text_config") or config)["num_hidden_layers"] == 1  # what is written is the cut model
    assert (out / "model.safetensors").stat().st_size < (whole / "model.safetensors").stat().st_size
    assert not (out / "modules.json").exists()  # transformers readers would apply the final norm
    assert "No sentence-transformers files" in (out / "README.md").read_text()
    exported = embedkit.load(out)
    assert exported.embedding_dim == dim and exported.backbone.num_layers == 1
    assert (exported.encode_items(items, batch_size=4) - ref).abs().max().item() <= 1e-6
    assert (exported.encode_items(items, batch_size=1) - ref).abs().max().item() <= 1e-5  # other padding: float error
    # an export at full depth loads cut the same way
    assert (embedkit.load(whole, layer=1, dim=dim).encode_items(items, 4) - ref).abs().max().item() <= 1e-6
    with pytest.raises(UserError, match="layer: must be between 1 and 1"):
        embedkit.load(out, layer=2)


def test_export_dim_only_keeps_sentence_transformers_with_truncate_dim(tmp_path):
    import sentence_transformers as st

    from tests.export.test_export import TEXTS, tiny_text_model

    base = tiny_text_model("llama", tmp_path / "base")
    run, _ = trained_run(tmp_path, ["model.backbone=hf_text", f"model.backbone.path={base}", "loss=matryoshka"])
    encoder = embedkit.load(run)
    d = encoder.provenance.dims[1]
    out = export_model(run, tmp_path / "export", dim=d, log=lambda m: None)
    assert json.loads((out / "config_sentence_transformers.json").read_text())["truncate_dim"] == d
    ref = encoder.encode(texts=TEXTS, dim=d)
    assert (embedkit.load(out).encode(texts=TEXTS) - ref).abs().max().item() <= 1e-6
    got = torch.as_tensor(st.SentenceTransformer(str(out), device="cpu").encode(TEXTS, normalize_embeddings=True))
    assert got.shape[1] == d and (got - ref).abs().max().item() <= 1e-5


def test_export_and_eval_words_errors_are_one_line(tmp_path, capsys):
    from embedkit.cli import main as cli

    run, _ = trained_run(tmp_path, ["model.backbone.name=hf_text", "model.backbone.tiny=true", "loss=matryoshka"])
    cases = ((["export", str(run), f"out={tmp_path / 'x'}", "layer=three"], "layer: expected a positive integer"),
             (["export", str(run), f"out={tmp_path / 'x'}", "layer=0"], "layer: must be >= 1"),
             (["export", str(run), f"out={tmp_path / 'x'}", "layer=9"], "layer: must be between 1 and 2"),
             (["export", str(run), f"out={tmp_path / 'x'}", "dim=12"], "dim: 12 is not a dim this model was trained"),
             (["eval", f"model={run}", f"data.eval.root={tmp_path}", "dim=-1"], "dim: must be >= 1"))
    for words, msg in cases:
        assert cli(words) == 2, words
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
    assert not (tmp_path / "x").exists()


def test_eval_at_a_depth_records_it_beside_the_full_model(tmp_path, monkeypatch):
    """Two evals of one run, full and cut: both summaries say their depth, and the MLflow run holds both
    sets of metrics under different names."""
    from mlflow.tracking import MlflowClient

    from embedkit.cli import main as cli

    root = tmp_path / "mmeb"
    fx.build(root, rows=12)
    run, module = trained_run(tmp_path, ["model.backbone.name=qwen2_vl", "model.backbone.tiny=true",
                                         "loss=matryoshka_2d", "loss.mode=sample", f"run.dir={tmp_path / 'run'}",
                                         "run.name=depthrun"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    trained = client.create_run(client.create_experiment("demo"), run_name="depthrun")
    client.log_param(trained.info.run_id, "run.dir", str(tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    words = ["eval", f"model={run}", f"data.eval.root={root}", "data.eval.datasets=[N24News,RefCOCO]",
             "train.chunk_size=8", f"tracking.uri={uri}"]
    assert cli(words) == 0
    assert cli([*words, "layer=1", "dim=16"]) == 0
    full = json.loads((run / "eval" / "summary.json").read_text())
    cut = json.loads((run / "eval-l1_d16" / "summary.json").read_text())
    assert full["depth"] == {"layer": 2, "dim": 64, "num_layers": 2, "embedding_dim": 64}
    assert cut["depth"] == {"layer": 1, "dim": 16, "num_layers": 2, "embedding_dim": 64}
    metrics = client.get_run(trained.info.run_id).data.metrics
    assert metrics["eval/overall/p_at_1"] == pytest.approx(full["aggregate"]["overall"])
    assert metrics["eval/overall/p_at_1/l1_d16"] == pytest.approx(cut["aggregate"]["overall"])
    assert metrics["eval/N24News/p_at_1/l1_d16"] == pytest.approx(cut["datasets"]["N24News"]["acc"])
    artifacts = {a.path for a in client.list_artifacts(trained.info.run_id, "eval-l1_d16")}
    assert artifacts == {"eval-l1_d16/summary.json", "eval-l1_d16/summary.md"}
    # the cut eval scored the cut model: its P@1 is the one encode(layer=1, dim=16) gives
    from embedkit.eval import mmeb

    direct = mmeb.evaluate(root, ["N24News", "RefCOCO"],
                           lambda items: module.encoder.encode_items(items, 8, layer=1, dim=16))
    assert direct["aggregate"]["overall"] == pytest.approx(cut["aggregate"]["overall"])
    assert direct["datasets"]["N24News"]["acc"] == cut["datasets"]["N24News"]["acc"]
