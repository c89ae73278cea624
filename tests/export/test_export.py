"""Export and inference (a trained model used outside the trainer): an export folder gives the training module's embeddings.

Models are built in-process (``EmbeddingModule.from_config``), their trainable weights moved off
their initialisation (as a short run would: the LoRA B matrices leave zero), and saved as an
``embedkit fit`` checkpoint; ``embedkit.load(export)`` must then embed exactly as the module does,
whatever the batch size or the padding side, with LoRA merged or kept beside the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import embedkit
from embedkit.data.schema import Item
from embedkit.export.writer import export_model

FAMILIES = ("hf_text", "qwen2_vl", "llava_onevision", "phi3_v")
TEXTS = ["a red circle at the top left", "blue square", "a green cross below a small red circle",
         "what shape is there", "one", "the large dog beside the car", "two cats", "a", "left right top"]


def items_for(family: str) -> list[Item]:
    if family == "hf_text":
        return [Item(text=t) for t in TEXTS]
    red, blue = Image.new("RGB", (56, 56), (200, 30, 30)), Image.new("RGB", (84, 56), (30, 30, 200))
    return [Item(text=TEXTS[0]), Item(image=red), Item(text=TEXTS[1], image=blue), Item(text=TEXTS[2]),
            Item(image=blue), Item(text=TEXTS[3], image=red), Item(text=TEXTS[4]), Item(text=TEXTS[5])]


def train_steps(module, cfg: dict, steps: int, batch: int = 6) -> None:
    """``steps`` real optimizer steps on demo examples: ChunkCollate (chunks of 4, so GradCache runs)
    -> ``backward_batch`` -> AdamW at the recipe's lr (no warmup: its first step would be tiny)."""
    from embedkit.data.batch import ChunkCollate
    from embedkit.data.demo import train_examples
    from embedkit.training.optim import build_optimizer

    demo = {**cfg["data"]["demo"], "text_only": cfg["model"]["backbone"]["name"] == "hf_text"}
    collate = ChunkCollate(module.encoder.processor(), chunk_size=4, num_negatives=1)
    optimizer = build_optimizer(module.parameters(), cfg["train"])
    module.train()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        out = module.backward_batch(collate(list(train_examples(demo, step * batch, (step + 1) * batch))),
                                    lambda t: t.backward())
        assert torch.isfinite(out.loss)
        optimizer.step()


def trained_run(tmp: Path, overrides: list[str], *, perturb: bool = True, steps: int = 0):
    """(run dir, module): a module whose trainable weights moved (``steps`` real optimizer steps, else
    a random perturbation), saved as a fit checkpoint."""
    from embedkit.config.loader import compose
    from embedkit.training.module import EmbeddingModule

    cfg = compose(["recipe=demo", *overrides])
    module = EmbeddingModule.from_config(cfg)
    if steps:
        train_steps(module, cfg, steps)
    elif perturb:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in module.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    module.eval()
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": cfg}, "global_step": 3},
               run / "checkpoints" / "last.ckpt")
    return run, module


def reference(module, items):
    with torch.no_grad():
        return module.encoder(module.encoder.processor()(items))


def assert_equal_embeddings(encoder, items, ref):
    for batch_size in (1, 3, 8):
        got = encoder.encode(items, batch_size=batch_size)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-5, batch_size
    # the other padding side: a tokenizer saved (or set) to pad on the left must not change anything
    tokenizer = encoder.processor().tokenizer
    tokenizer.padding_side = "left"
    try:
        got = encoder.encode(items, batch_size=8)
    finally:
        tokenizer.padding_side = "right"
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_export_load_equals_the_training_module(family, tmp_path):
    run, module = trained_run(tmp_path, [f"model.backbone={family}", "model.backbone.tiny=true",
                                         "model.lora.enabled=true", "loss=matryoshka"])
    items = items_for(family)
    ref = reference(module, items)
    for merge in (True, False):
        out = export_model(run, tmp_path / f"export-{merge}", merge_lora=merge, log=lambda m: None)
        meta = json.loads((out / "embedkit.json").read_text())
        assert meta["merged"] is merge and (out / "embedkit_adapter.safetensors").is_file() is not merge
        assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()
        encoder = embedkit.load(out)
        assert not encoder.training
        assert_equal_embeddings(encoder, items, ref)
        # Matryoshka dims recorded; encode(dim=) is the re-normalised prefix
        assert encoder.provenance.dims and encoder.provenance.dims[0] == ref.shape[1]
        d = encoder.provenance.dims[1]
        sliced = torch.nn.functional.normalize(ref[:, :d], dim=-1)
        got = encoder.encode(texts=[it.text for it in items], images=[it.image for it in items], dim=d)
        assert (got - sliced).abs().max().item() <= 1e-5
    # a run dir and a checkpoint load too
    assert (embedkit.load(run).encode(items[:3]) - ref[:3]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["hf_text", "qwen2_vl"])
def test_export_after_real_training_steps_equals_the_module(family, tmp_path):
    """The end of a real (short) run: 2 AdamW steps through backward_batch with LoRA on, then export
    (merged and separate) + load embeds as the module does, at batch sizes 1, 3 and 8."""
    from embedkit.backbones.lora import lora_is_zero

    run, module = trained_run(tmp_path, [f"model.backbone={family}", "model.backbone.tiny=true",
                                         "model.lora.enabled=true", "model.pooling=latent_attention",
                                         "model.pooling.num_latents=8", "model.pooling.num_heads=4"], steps=2)
    assert not lora_is_zero(module.encoder.backbone)
    items = items_for(family)
    ref = reference(module, items)
    for merge in (True, False):
        encoder = embedkit.load(export_model(run, tmp_path / f"export-{merge}", merge_lora=merge, log=lambda m: None))
        assert_equal_embeddings(encoder, items, ref)


def test_export_refuses_a_zero_adapter(tmp_path):
    from embedkit.cli import main as cli

    run, _ = trained_run(tmp_path, ["model.backbone=hf_text", "model.backbone.tiny=true", "model.lora.enabled=true"],
                         perturb=False)
    assert cli(["export", str(run), f"out={tmp_path / 'out'}"]) == 2
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial*"))


def test_model_card_names_the_mlflow_run_and_its_metrics(tmp_path, monkeypatch):
    """The card carries the training run's MLflow id and the latest value of each metric it logged
    (found as ``embedkit eval`` finds it: name + run.dir, in the run's store); a missing store or run,
    or tracking off, is said on the card and never fails the export (mlflow not even imported)."""
    import sys

    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # beside the run dir: where the default store would be
    client = MlflowClient(tracking_uri=store)
    exp = client.create_experiment("cards", artifact_location=str(tmp_path / "artifacts"))
    other = client.create_run(exp, run_name="card-run").info.run_id  # same name, another run.dir
    client.log_param(other, "run.dir", str(tmp_path / "elsewhere"))
    run_id = client.create_run(exp, run_name="card-run").info.run_id
    client.log_param(run_id, "run.dir", str(tmp_path / "run"))
    for step, (loss, p1) in enumerate([(2.0, 0.25), (1.5, 0.5)]):
        client.log_metric(run_id, "train/loss", loss, step=step)
        client.log_metric(run_id, "val/p_at_1", p1, step=step)
    client.log_metric(run_id, "eval/N24News/p_at_1", 0.375, step=1)
    client.log_metric(other, "val/p_at_1", 0.9, step=0)
    base = ["model.backbone=hf_text", "model.backbone.tiny=true", "run.name=card-run", f"run.dir={tmp_path / 'run'}",
            "tracking.experiment=cards"]
    run, _ = trained_run(tmp_path, base)
    card = (export_model(run, tmp_path / "export", log=lambda m: None) / "README.md").read_text()
    assert f"run id `{run_id}`" in card and other not in card
    for line in ("| val/p@1 | 0.5000 |", "| train/loss | 1.5000 |", "| eval/N24News/p@1 | 0.3750 |"):
        assert line in card
    meta = json.loads((tmp_path / "export" / "embedkit.json").read_text())
    assert meta["mlflow"]["run_id"] == run_id and meta["metrics"]["val/p@1"] == 0.5

    # a configured store that does not exist: said on the card, and not created
    missing = tmp_path / "nowhere" / "mlflow.db"
    (tmp_path / "run").rename(tmp_path / "run-old")
    run, _ = trained_run(tmp_path, [*base, f"tracking.uri=sqlite:///{missing}"])
    card = (export_model(run, tmp_path / "export2", log=lambda m: None) / "README.md").read_text()
    assert "no MLflow store found" in card and "run id" not in card and not missing.parent.exists()
    # a run the store does not hold
    (tmp_path / "run").rename(tmp_path / "run-old2")
    run, _ = trained_run(tmp_path, [*base, "run.name=never-logged"])
    card = (export_model(run, tmp_path / "export3", log=lambda m: None) / "README.md").read_text()
    assert "no run named 'never-logged' in experiment 'cards'" in card and "## Metrics" not in card
    # tracking off: mlflow is not imported at all
    (tmp_path / "run").rename(tmp_path / "run-old3")
    run, _ = trained_run(tmp_path, [*base, "tracking.enabled=false"])
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    card = (export_model(run, tmp_path / "export4", log=lambda m: None) / "README.md").read_text()
    assert "tracking was off for this run" in card


def test_export_cli_errors(tmp_path, capsys):
    from embedkit.cli import main as cli

    assert cli(["export", str(tmp_path / "missing"), f"out={tmp_path / 'o'}"]) == 2
    assert cli(["export", str(tmp_path)]) == 2
    assert cli(["export", str(tmp_path), "out=x", "colour=red"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("embedkit: error:") for line in err)


# -- sentence-transformers -------------------------------------------------------------------------

def tiny_text_model(kind: str, folder: Path) -> Path:
    """A tiny BERT (no EOS: BERT has none) or a tiny Llama decoder (EOS appended by embedkit), saved
    with the offline word-level tokenizer. The decoder is a Llama: transformers replaces a saved
    generic tokenizer by the model type's own class for some types (qwen2 among them), which
    sentence-transformers' AutoTokenizer would do too (docs/bugs-and-fixes.md)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    from embedkit.backbones.processors import tiny_tokenizer

    torch.manual_seed(0)
    if kind == "bert":
        tok = tiny_tokenizer(["[CLS]", "[SEP]"], pad="[PAD]", eos="[SEP]")
        tok.eos_token = None
        model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, pad_token_id=tok.pad_token_id), add_pooling_layer=False)
    else:
        tok = tiny_tokenizer([], pad="<pad>", eos="</s>")
        model = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("kind,pooling", [("bert", "mean"), ("llama", "last_token"), ("llama", "mean")])
def test_sentence_transformers_equals_embedkit(kind, pooling, tmp_path):
    import sentence_transformers as st  # the `st` extra, which make test installs
    base = tiny_text_model(kind, tmp_path / "base")
    run, module = trained_run(tmp_path, ["model.backbone=hf_text", f"model.backbone.path={base}",
                                         f"model.pooling={pooling}", "model.lora.enabled=true", "loss=matryoshka"])
    out = export_model(run, tmp_path / "export", prompts={"query": "find the picture of "}, log=lambda m: None)
    encoder = embedkit.load(out)
    ref = encoder.encode(texts=TEXTS)
    assert (ref - reference(module, [Item(text=t) for t in TEXTS])).abs().max().item() <= 1e-5
    model = st.SentenceTransformer(str(out), device="cpu")
    got = torch.as_tensor(model.encode(TEXTS, batch_size=4))
    assert (got - ref).abs().max().item() <= 1e-5
    # an instruction prompt: ST's prompt_name == embedkit's instruction (by name or literally)
    q = encoder.encode(texts=TEXTS, instruction="query")
    assert (q - encoder.encode(texts=TEXTS, instruction="find the picture of ")).abs().max().item() == 0
    assert (q - ref).abs().max().item() > 1e-3
    got = torch.as_tensor(model.encode(TEXTS, prompt_name="query", batch_size=3))
    assert (got - q).abs().max().item() <= 1e-5
    # truncate_dim == embedkit's Matryoshka slice
    d = encoder.provenance.dims[1]
    small = st.SentenceTransformer(str(out), device="cpu", truncate_dim=d)
    got = torch.as_tensor(small.encode(TEXTS, normalize_embeddings=True))
    assert got.shape[1] == d
    assert (got - encoder.encode(texts=TEXTS, dim=d)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("pooling", ["latent_attention", "multi_layer"])
def test_sentence_transformers_custom_pooling_module(pooling, tmp_path):
    """Heads ST lacks: ``1_EmbedkitPooling`` (``embedkit.export.st_module``) pools like embedkit, with and
    without a prompt, and survives ST's own save and reload (its weights copied into the module folder)."""
    import sentence_transformers as st  # the `st` extra: a missing one fails here rather than skipping
    base = tiny_text_model("llama", tmp_path / "base")
    run, module = trained_run(tmp_path, ["model.backbone=hf_text", f"model.backbone.path={base}",
                                         f"model.pooling={pooling}", "model.pooling.num_heads=4",
                                         "model.lora.enabled=true"])
    out = export_model(run, tmp_path / "export", prompts={"query": "find the picture of "}, log=lambda m: None)
    modules = json.loads((out / "modules.json").read_text())
    assert modules[1]["type"] == "embedkit.export.st_module.EmbedkitPooling"
    encoder = embedkit.load(out)
    ref = encoder.encode(texts=TEXTS)
    assert (ref - reference(module, [Item(text=t) for t in TEXTS])).abs().max().item() <= 1e-5
    q = encoder.encode(texts=TEXTS, instruction="query")
    assert (q - ref).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="trust_remote_code"):
        st.SentenceTransformer(str(out), device="cpu")  # sentence-transformers 6: code outside its package
    model = st.SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    assert model.get_embedding_dimension() == ref.shape[1]
    for batch_size in (1, 3, 8):
        got = torch.as_tensor(model.encode(TEXTS, batch_size=batch_size))
        assert (got - ref).abs().max().item() <= 1e-5, batch_size
    got = torch.as_tensor(model.encode(TEXTS, prompt_name="query", batch_size=4))
    assert (got - q).abs().max().item() <= 1e-5
    model.save(str(tmp_path / "resaved"))
    assert (tmp_path / "resaved" / "1_EmbedkitPooling" / "model.safetensors").is_file()
    again = st.SentenceTransformer(str(tmp_path / "resaved"), device="cpu", trust_remote_code=True)
    got = torch.as_tensor(again.encode(TEXTS, prompt_name="query", batch_size=4))
    assert (got - q).abs().max().item() <= 1e-5


def test_qwen2_vl_chat_template_gives_embedkit_token_ids(tmp_path):
    """The written chat template + the saved processor files == embedkit's processor, token for token.

    transformers' ``Qwen2VLProcessor`` cannot be built here (it insists on a torchvision video
    processor, and torchvision does not import beside the CPU torch build), so the test applies its
    documented rule itself: render the chat template, expand each ``<|image_pad|>`` to
    ``prod(image_grid_thw) / merge_size**2`` copies using the saved image processor, tokenize without
    special tokens. The full sentence-transformers image round trip needs that stock processor too,
    so it is not run on this build.
    """
    from transformers import Qwen2VLImageProcessorPil

    from embedkit.backbones.checkpoints.files import load_tokenizer

    run, module = trained_run(tmp_path, ["model.backbone=qwen2_vl", "model.backbone.tiny=true"])
    out = export_model(run, tmp_path / "export", log=lambda m: None)
    sbert = json.loads((out / "sentence_bert_config.json").read_text())
    assert set(sbert["modality_config"]) == {"text", "image", "message"} and sbert["unpad_inputs"] is False
    tokenizer = load_tokenizer(str(out))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(out))
    merge = json.loads((out / "config.json").read_text())["vision_config"]["spatial_merge_size"]
    ours = embedkit.load(out).processor()
    img = Image.new("RGB", (84, 56), (30, 30, 200))
    for text, image in [("a blue square", img), ("a red circle", None), (None, img)]:
        content = ([{"type": "image"}] if image is not None else []) + ([{"type": "text", "text": text}] if text else [])
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        if image is not None:
            vision = image_processor(images=[image], return_tensors="pt")
            n = int(vision["image_grid_thw"][0].prod()) // merge**2
            rendered = rendered.replace("<|image_pad|>", "<|image_pad|>" * n)
        got = tokenizer([rendered], add_special_tokens=False)["input_ids"]
        want = ours([Item(text=text, image=image)])
        assert got == want["input_ids"].tolist(), (text, image is not None)
        if image is not None:
            assert torch.equal(vision["pixel_values"], want["pixel_values"])


@pytest.mark.parametrize("family,marker", [("llava_onevision", "<image>"), ("phi3_v", "<|image_1|>")])
def test_vlm_chat_templates_give_embedkit_token_ids(family, marker, tmp_path):
    """LLaVA-OneVision and Phi-3.5-V: the written chat template renders embedkit's input string (the
    image marker, a newline, the text, EOS). The stock processors (not buildable here, as for Qwen2-VL)
    expand the one marker into the image's tokens; the test does that with the count embedkit's
    processor used (LLaVA-OV: ``<image>`` repeated; Phi-3.5-V: -1 ids, as its processor inserts) and
    compares token ids."""
    from embedkit.backbones.checkpoints.files import load_tokenizer

    run, module = trained_run(tmp_path, [f"model.backbone={family}", "model.backbone.tiny=true"])
    out = export_model(run, tmp_path / "export", log=lambda m: None)
    tokenizer = load_tokenizer(str(out))
    ours = embedkit.load(out).processor()
    img = Image.new("RGB", (84, 56), (30, 30, 200))
    for text, image in [("a blue square", img), ("a red circle", None), (None, img)]:
        content = ([{"type": "image"}] if image is not None else []) + ([{"type": "text", "text": text}] if text else [])
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        want = ours([Item(text=text, image=image)])["input_ids"][0].tolist()
        before, found, after = rendered.partition(marker)
        assert bool(found) == (image is not None) and marker not in after
        ids = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] if t else []  # noqa: E731
        if family == "llava_onevision":
            image_id = tokenizer.convert_tokens_to_ids(marker)
            n = want.count(image_id)
            got = ids(before + marker * n + after) if found else ids(rendered)
        else:
            n = want.count(-1)
            got = ids(before) + [-1] * n + ids(after) if found else ids(rendered)
        assert (n > 0) == (image is not None)
        assert got == want, (family, text, image is not None)


def test_encode_resumes_after_an_interruption(tmp_path, monkeypatch):
    import numpy as np

    from embedkit.cli import main as cli
    from embedkit.encoder import Encoder

    run, module = trained_run(tmp_path, ["model.backbone=hf_text", "model.backbone.tiny=true"])
    out = export_model(run, tmp_path / "export", log=lambda m: None)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    args = [f"model={out}", f"input={corpus}", "part_size=2", "batch_size=3"]
    assert cli(["encode", *args, f"out={tmp_path / 'whole.npy'}"]) == 0
    whole = np.load(tmp_path / "whole.npy")
    ref = reference(module, [Item(text=t) for t in TEXTS]).numpy()
    assert whole.shape == ref.shape and np.abs(whole - ref).max() <= 1e-5
    # the engine's options: a token budget, loader workers, the model run in bfloat16 (float32 out)
    assert cli(["encode", *args, "batch_tokens=8", "num_workers=1", f"out={tmp_path / 'budget.npy'}"]) == 0
    assert np.abs(np.load(tmp_path / "budget.npy") - whole).max() <= 1e-6
    assert cli(["encode", *args, "dtype=bfloat16", f"out={tmp_path / 'bf16.npy'}"]) == 0
    bf16 = np.load(tmp_path / "bf16.npy")
    assert bf16.dtype == np.float32 and 0 < np.abs(bf16 - whole).max() <= 5e-2

    real, calls = Encoder.encode_items, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    target = tmp_path / "resumed.npy"
    monkeypatch.setattr(Encoder, "encode_items", interrupted)
    assert cli(["encode", *args, f"out={target}"]) == 130
    assert not target.exists() and len(list((tmp_path / "resumed.npy.parts").glob("part-*.npy"))) == 2
    monkeypatch.setattr(Encoder, "encode_items", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    calls.clear()
    assert cli(["encode", *args, f"out={target}"]) == 0
    assert len(calls) == 3  # 5 parts, 2 were already written
    assert target.read_bytes() == (tmp_path / "whole.npy").read_bytes()
    assert not (tmp_path / "resumed.npy.parts").exists()
    assert cli(["encode", *args, f"out={tmp_path / 'emb.parquet'}"]) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "emb.parquet")
    assert np.allclose(np.array(table.column("embedding").to_pylist()), whole)


def test_eval_scores_an_export_folder(tmp_path):

    from embedkit.cli import main as cli
    from tests.helpers import mmeb_fixture as fx

    root = tmp_path / "mmeb"
    fx.build(root, rows=8)
    run, _ = trained_run(tmp_path, ["model.backbone=qwen2_vl", "model.backbone.tiny=true"])
    out = export_model(run, tmp_path / "export", log=lambda m: None)
    assert cli(["eval", f"model={out}", f"data.eval.root={root}", "data.eval.datasets=[N24News]",
                "tracking.enabled=false", f"out={tmp_path / 'scores'}"]) == 0
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert "N24News" in json.dumps(summary)
    assert cli(["eval", f"model={out}", f"ckpt={run}", f"data.eval.root={root}"]) == 2
