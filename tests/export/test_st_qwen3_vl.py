"""The sentence-transformers export of a fine-tuned Qwen3-VL-Embedding (issue 29 item 4), and of GME (the same
frame on qwen2_vl): ``embedkit export`` of a qwen3_vl run in Qwen3-VL-Embedding's layout (``prompt: chat``, ``<|endoftext|>`` appended, last token, L2)
writes ``modules.json`` = Transformer (feature-extraction, structured messages, the chat template with the
generation prompt) -> Pooling (lasttoken, include_prompt) -> Normalize, the layout of the released model's ST
integration (research note qwen-vl-backbones.md sec. 1.5), and ``SentenceTransformer(export)`` embeds text,
image and image+text inputs as ``embedkit.load(export)`` does.

transformers' ``Qwen3VLProcessor`` cannot be built on this CPU-torch machine: ``ProcessorMixin`` class-checks
its video processor, which needs torchvision (research note sec. 3.2). sentence-transformers loads it with
``AutoProcessor.from_pretrained(folder)``; the test replaces that one call (``AutoProcessor`` as the module
``sentence_transformers.base.modules.transformer`` names it) with the same processor class built from the same
folder's files, its video processor left out (``NoVideoProcessor``: the class check accepts ``None`` for
it). Everything after that is sentence-transformers' and transformers' own code: the message conversion, the
system message from a prompt, the chat template rendering, the processor's image-token expansion and
``mm_token_type_ids``, the model, ST's pooling and normalisation.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import embedkit
from embedkit.data.schema import Item
from embedkit.export.writer import export_model
from tests.export.test_export import trained_run

INSTRUCTION = "find the red circle"
#: the layouts: Qwen3-VL-Embedding's (qwen3_vl, 32-px tokens) and GME's (qwen2_vl, 28-px tokens; the same frame
#: with "You are a helpful assistant." as the documents' system message)
RUNS = {
    "qwen3_vl_embedding": ["model.backbone=qwen3_vl", "model.backbone.min_pixels=1024", "model.backbone.max_pixels=16384",
                           "model.backbone.candidate_system_prompt=Represent the user's input."],
    "gme": ["model.backbone=qwen2_vl", "model.backbone.min_pixels=3136", "model.backbone.max_pixels=12544",
            "model.backbone.system_prompt=You are a helpful assistant.",
            "model.backbone.candidate_system_prompt=You are a helpful assistant."],
}
COMMON = ["model.backbone.tiny=true", "model.backbone.prompt=chat", "model.backbone.append_token=<|endoftext|>",
          "model.lora.enabled=true"]


def processor_loader():
    """An ``AutoProcessor`` stand-in: ``from_pretrained(folder)`` -> the folder's ``Qwen3VLProcessor`` (its
    saved image processor, tokenizer and chat template) without a video processor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor, Qwen3VLProcessor

    def no_video(base):
        class NoVideoProcessor(base):
            def check_argument_for_proper_class(self, name, arg):
                if name == "video_processor" and arg is None:
                    return None
                return super().check_argument_for_proper_class(name, arg)
        return NoVideoProcessor

    class Loader:
        @staticmethod
        def from_pretrained(folder, **kwargs):
            kwargs.pop("trust_remote_code", None)
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            base = Qwen3VLProcessor if AutoConfig.from_pretrained(folder).model_type == "qwen3_vl" else Qwen2VLProcessor
            return no_video(base)(image_processor=AutoImageProcessor.from_pretrained(folder), tokenizer=tokenizer,
                                    video_processor=None, chat_template=tokenizer.chat_template)

    return Loader


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    """An export of a trained-looking qwen3_vl run (``trained_run``: LoRA moved off zero, merged on export)."""
    layout, *extra = request.param
    tmp = tmp_path_factory.mktemp(layout)
    run, _ = trained_run(tmp, RUNS[layout][:1] + COMMON + RUNS[layout][1:] + extra)  # the family first
    return export_model(run, tmp / "export", log=lambda m: None)


def st_model(folder, monkeypatch):
    import sentence_transformers.base.modules.transformer as st_transformer
    from sentence_transformers import SentenceTransformer

    monkeypatch.setattr(st_transformer, "AutoProcessor", processor_loader())
    return SentenceTransformer(str(folder), device="cpu")


def pictures():
    return [Image.new("RGB", (64, 96), (200, 30, 30)), Image.new("RGB", (96, 64), (30, 30, 200))]


LAYOUTS = pytest.mark.parametrize("exported", [[name] for name in RUNS], indirect=True, ids=list(RUNS))


@LAYOUTS
def test_export_writes_the_released_st_layout(exported):
    modules = json.loads((exported / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((exported / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "lasttoken" and pooling["include_prompt"] is True
    bert = json.loads((exported / "sentence_bert_config.json").read_text())
    assert bert["transformer_task"] == "feature-extraction"
    assert bert["modality_config"]["message"]["format"] == "structured"
    assert bert["processing_kwargs"] == {"chat_template": {"add_generation_prompt": True}}
    assert "no_sentence_transformers" not in json.loads((exported / "embedkit.json").read_text())


@LAYOUTS
def test_sentence_transformers_embeds_as_embedkit(exported, monkeypatch):
    """Text, image and image+text, each modality a batch of its own and all in one: ST's embeddings equal
    ``embedkit.load``'s (<= 1e-5)."""
    ours = embedkit.load(exported)
    model = st_model(exported, monkeypatch)
    red, blue = pictures()
    texts = ["a red circle at the top left", "blue square", "two"]
    got = torch.as_tensor(model.encode(texts, batch_size=2))
    assert (got - ours.encode(texts=texts)).abs().max() <= 1e-5
    got = torch.as_tensor(model.encode([red, blue], batch_size=2))
    assert (got - ours.encode(images=[red, blue])).abs().max() <= 1e-5
    fused = [{"text": "a red circle", "image": red}, {"text": "blue square", "image": blue}]
    got = torch.as_tensor(model.encode(fused, batch_size=2))
    want = ours.encode([Item("a red circle", red), Item("blue square", blue)])
    assert (got - want).abs().max() <= 1e-5
    # the test can fail: the template without the appended token pools another state
    tokenizer = model[0].processor.tokenizer
    model[0].processor.chat_template = tokenizer.chat_template.replace("<|endoftext|>", "")
    assert (torch.as_tensor(model.encode(texts, batch_size=2)) - ours.encode(texts=texts)).abs().max() > 1e-3


@pytest.mark.parametrize("exported", [[name, f"model.backbone.system_prompt={INSTRUCTION}"] for name in RUNS],
                         indirect=True, ids=list(RUNS))
def test_the_query_side_is_the_st_query_prompt(exported, monkeypatch):
    """A run whose queries had an instruction as system message: ST's ``prompt_name="query"`` sends it as the
    system message (side ``query``), no prompt gives the documents' (side ``candidate``)."""
    ours = embedkit.load(exported)
    model = st_model(exported, monkeypatch)
    assert model.prompts["query"] == INSTRUCTION
    texts = ["a red circle at the top left", "blue square"]
    queries = torch.as_tensor(model.encode(texts, prompt_name="query"))
    documents = torch.as_tensor(model.encode(texts))
    assert (queries - ours.encode(texts=texts, side="query")).abs().max() <= 1e-5
    assert (documents - ours.encode(texts=texts, side="candidate")).abs().max() <= 1e-5
    assert (queries - documents).abs().max() > 1e-3


@pytest.mark.parametrize("exported", [["gme", f"model.backbone.system_prompt={INSTRUCTION}"]], indirect=True,
                         ids=["gme"])
def test_encode_a_corpus_as_candidates(exported, tmp_path):
    """``embedkit encode side=candidate`` frames the rows as documents (GME's default system message), as
    ``encode(side="candidate")``; without it they are queries (the instruction)."""
    import numpy as np

    from embedkit.cli import main as cli_main

    texts = ["a red circle at the top left", "blue square"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ours = embedkit.load(exported)
    for side in ("candidate", None):
        out = tmp_path / f"{side}.npy"
        assert cli_main(["encode", f"model={exported}", f"input={corpus}", f"out={out}",
                         *([f"side={side}"] if side else [])]) == 0
        want = ours.encode(texts=texts, side=side)
        assert (torch.from_numpy(np.load(out)) - want).abs().max() <= 1e-5
    assert (torch.from_numpy(np.load(tmp_path / "candidate.npy")) - ours.encode(texts=texts)).abs().max() > 1e-3
