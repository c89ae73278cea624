"""Qwen3-VL (issue 29): host position ids equal transformers' ``get_rope_index`` (image, several images,
video, mixed chunks), the forward equals ``Qwen3VLModel(**inputs)`` (deepstack included), token counts by
arithmetic equal the processed lengths, the video text equals Qwen3-VL's processor's, a text-only chunk
keeps a trainable tower (and its deepstack mergers) in the graph, LoRA adapts the language model only, a
``...ForConditionalGeneration`` checkpoint loads by ``path``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from embedkit.backbones.lora import adapted_module_names, apply_lora
from embedkit.backbones.qwen3_vl import Qwen3VLBackbone, timestamps
from embedkit.backbones.qwen3_vl.processing import video_text
from embedkit.data.schema import Frames, Item
from embedkit.errors import UserError
from tests.helpers.images import speckled_image

PIXELS = dict(min_pixels=32 * 32, max_pixels=128 * 128)
SYSTEM = "Represent the user's input."


@pytest.fixture(scope="module")
def backbone():
    return Qwen3VLBackbone(seed=0, tiny=True, freeze_vision=False, **PIXELS).train()


def video(n: int, w: int = 96, h: int = 64, seed: int = 0, stamps=None, duration=None):
    return Frames([speckled_image(w, h, seed + i) for i in range(n)], stamps, list(range(0, 3 * n, 3)), 3 * n,
                  duration)


def images(k: int, seed: int = 0):
    sizes = [(64, 64), (128, 64), (96, 160), (32, 96)]
    return [speckled_image(*sizes[i % len(sizes)], seed + i) for i in range(k)]


ITEMS = {
    "image": [Item(text="a photo", images=images(1)), Item(text="a cat")],
    "images": [Item(text="<|image_2|> two <|image_1|> images", images=images(2, 3)),
               Item(text="three images", images=images(3, 7))],
    "video": [Item(text="a video <|video_1|> of four", video=video(4, stamps=[0.0, 0.5, 1.0, 1.5])),
              Item(text="seven frames", video=video(7, 64, 96, 9))],
    "mixed": [Item(text="a cat"), Item(text="an image", images=images(1, 2)),
              Item(text="a clip", video=video(5, duration=2.5)), Item(text="two", images=images(2, 4))],
}


def processor(backbone, system):
    """The backbone's chunk processor, in Qwen3-VL-Embedding's chat layout when ``system`` is set."""
    from embedkit.backbones.qwen3_vl import Qwen3VLChunkProcessor

    return Qwen3VLChunkProcessor(backbone.tokenizer, backbone.image_processor, backbone.merge_size,
                                 backbone.max_length, video=backbone.video, system=system,
                                 append_token="<|endoftext|>" if system else None)


def model_inputs(chunk: dict) -> dict:
    """The chunk without the host's position ids: what transformers' own forward computes from."""
    return {k: v for k, v in chunk.items() if k != "position_ids"}


@pytest.mark.parametrize("case", list(ITEMS))
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_host_positions_equal_get_rope_index(backbone, case, system):
    chunk = processor(backbone, system)(ITEMS[case])
    ref, _ = backbone.model.get_rope_index(chunk["input_ids"], chunk["mm_token_type_ids"],
                                           chunk.get("image_grid_thw"), chunk.get("video_grid_thw"),
                                           chunk["attention_mask"])
    mask = chunk["attention_mask"].bool()
    assert torch.equal(chunk["position_ids"][:, mask], ref[:, mask])
    if case in ("video", "mixed"):  # frames split: not Qwen2-VL's single (t, h, w) block
        assert chunk["position_ids"][0].max() > chunk["position_ids"][1].max() - 4


@pytest.mark.parametrize("case", list(ITEMS))
def test_forward_equals_transformers_own_with_deepstack(backbone, case):
    chunk = backbone.make_processor()(ITEMS[case])
    with torch.no_grad():
        ours = backbone(chunk).hidden
        ref = backbone.model(**model_inputs(chunk), use_cache=False).last_hidden_state
    assert (ours - ref).abs().max() <= 1e-5
    if case != "image":
        return
    # deepstack is in play: the same forward without it differs (so equality above is not vacuous)
    visual = backbone.model.visual
    saved = visual.deepstack_visual_indexes
    visual.deepstack_visual_indexes = []
    try:
        with torch.no_grad():
            without = backbone(chunk).hidden
    finally:
        visual.deepstack_visual_indexes = saved
    assert (without - ref).abs().max() > 1e-3


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_num_tokens_is_the_processed_length(backbone, system):
    chunks = processor(backbone, system)
    items = [it for case in ITEMS.values() for it in case] + [Item(text="just text")]
    chunk = chunks(items)
    assert chunk["attention_mask"].sum(1).tolist() == [chunks.num_tokens(it) for it in items]
    for it in items:
        assert chunks([it])["input_ids"].shape[1] == chunks.num_tokens(it)


def test_video_text_is_qwen3_vl_processors(backbone):
    """Our video text against transformers' ``Qwen3VLProcessor.replace_video_token`` (called on a stand-in
    ``self``: the processor itself cannot be built without torchvision), frame indices at 6 fps."""
    from transformers import Qwen3VLProcessor

    frames = video(7, stamps=[i * 3 / 6 for i in range(7)])
    chunk = backbone.make_processor()([Item(text="x", video=frames)])
    grid = chunk["video_grid_thw"]
    merge = backbone.merge_size
    stand_in = SimpleNamespace(
        video_processor=SimpleNamespace(merge_size=merge, temporal_patch_size=2), video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
        _calculate_timestamps=lambda idx, fps, m: Qwen3VLProcessor._calculate_timestamps(None, idx, fps, m))
    metadata = SimpleNamespace(fps=6.0, frames_indices=list(frames.indices))
    upstream = Qwen3VLProcessor.replace_video_token(stand_in, {"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
    ours = video_text(timestamps(frames, 2), int(grid[0, 1:].prod()) // merge**2)
    assert ours == upstream and ours.startswith("<0.2 seconds><|vision_start|>")


def test_qwen2_vl_video_pixels_fit_patch_16(backbone):
    """qwen2_vl's ``video_pixels`` with Qwen3-VL's processor: rows of width 3 * 2 * 16 * 16, and a video of
    one repeated image is the image processor's rows of that image, tiled (per temporal patch)."""
    image = speckled_image(96, 64, 5)
    chunk = backbone.make_processor()([Item(text="x", video=Frames([image] * 4, [0.0, 1.0, 2.0, 3.0], [0, 1, 2, 3], 4))])
    still = backbone.image_processor(images=[image], return_tensors="pt")
    assert chunk["pixel_values_videos"].shape[1] == 3 * 2 * 16 * 16
    assert chunk["video_grid_thw"].tolist() == [[2, *still["image_grid_thw"][0, 1:].tolist()]]
    assert torch.allclose(chunk["pixel_values_videos"], still["pixel_values"].repeat(2, 1))


def test_timestamps_without_stamps_use_the_duration_else_24_fps():
    assert timestamps(video(4, stamps=[0.0, 1.0, 2.0, 3.0]), 2) == [0.5, 2.5]
    assert timestamps(video(3, stamps=[0.0, 1.0, 2.0]), 2) == [0.5, 2.0]  # padded with the last frame
    assert timestamps(video(4, duration=1.2), 2) == pytest.approx([0.15, 0.75])  # 12 frames in 1.2 s: 10 fps
    assert timestamps(video(4), 2) == pytest.approx([1.5 / 24, 7.5 / 24])  # transformers' fallback


def test_a_chunk_without_pixels_keeps_the_tower_and_deepstack_mergers_in_the_graph(backbone):
    chunk = backbone.make_processor()([Item(text="a cat"), Item(text="a red circle")])
    named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    out = backbone(chunk)
    grads = torch.autograd.grad(out.hidden.sum(), [p for _, p in named], allow_unused=True)
    tower = {n: g for (n, _), g in zip(named, grads) if n.startswith("model.visual.")}
    assert tower and all(g is not None and not g.any() for g in tower.values())
    assert any(n.startswith("model.visual.deepstack_merger_list.") for n in tower)
    with torch.no_grad():
        ref = backbone.model(**model_inputs(chunk), use_cache=False).last_hidden_state
    mask = chunk["attention_mask"].bool()  # padding: our position 0, transformers' arange
    assert (out.hidden.detach()[mask] - ref[mask]).abs().max() <= 1e-6


def test_lora_adapts_the_language_model_only():
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "dora": False, "target": None}
    names = set(adapted_module_names(apply_lora(Qwen3VLBackbone(seed=0, tiny=True, **PIXELS), lora)))
    decoder = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert names == {f"model.language_model.layers.{i}.{m}" for i in range(2) for m in decoder}


def test_a_conditional_generation_checkpoint_loads_by_path(backbone, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    full = Qwen3VLForConditionalGeneration(backbone.model.config)
    full.model.load_state_dict(backbone.model.state_dict())
    full.save_pretrained(tmp_path)
    backbone.tokenizer.save_pretrained(tmp_path)
    backbone.image_processor.save_pretrained(tmp_path)
    loaded = Qwen3VLBackbone(seed=0, path=str(tmp_path), **PIXELS).eval()
    chunk = loaded.make_processor()(ITEMS["mixed"])
    assert loaded.image_processor.patch_size == 16 and list(loaded.image_processor.image_mean) == [0.5] * 3
    with torch.no_grad():
        assert torch.equal(loaded(chunk).hidden, backbone.eval()(chunk).hidden)
    backbone.train()


def test_bad_input_is_a_one_line_error(backbone):
    with pytest.raises(ValueError, match="does not match"):
        backbone.make_processor()([Item(text="<|image_2|> only", images=images(1))])
    with pytest.raises(UserError, match="append_token: the tokenizer has no single token 'two words'"):
        Qwen3VLBackbone(seed=0, tiny=True, append_token="two words")
    assert backbone.make_processor().refusal(Item(text="<|image_3|>", images=images(1))) is not None


# -- golden parity with Qwen3-VL-Embedding's reference steps ------------------------------------------------
#: the Qwen2/Qwen3 tokenizer's ids of the special tokens Qwen3-VL-Embedding's input uses (Qwen3-VL config:
#: image_token_id 151655, video_token_id 151656, vision_start/end 151652/151653; vocab 151936)
REAL_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
REAL_VOCAB = 151936
NEWLINE = "newlinetoken"
SMALL = dict(min_pixels=32 * 32, max_pixels=96 * 96)


def released_tokenizer():
    """A word-level tokenizer carrying Qwen3-VL's special tokens at their real ids (words below them), with
    "\n" as a token (``NEWLINE``)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from embedkit.backbones.processors import tiny_vocabulary

    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", NEWLINE, "system", "user", "assistant", *tiny_vocabulary()]))}
    vocab.update(REAL_IDS)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    # "\n" a token of its own (a whitespace split would drop it): the template's newlines count
    tok.normalizer = normalizers.Sequence([normalizers.Replace("\n", f" {NEWLINE} "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    others = [t for t in REAL_IDS if t not in ("<|endoftext|>", "<|im_end|>")]
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", additional_special_tokens=others)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny random Qwen3-VL-Embedding in the released layout: ``Qwen3VLForConditionalGeneration`` (tied
    embeddings, as the 2B), its tokenizer and Qwen3-VL's image processor config."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    folder = tmp_path_factory.mktemp("qwen3_vl_embedding")
    tok = released_tokenizer()
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=REAL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                         eos_token_id=REAL_IDS["<|im_end|>"], pad_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                           deepstack_visual_indexes=[0, 1]),
        image_token_id=REAL_IDS["<|image_pad|>"], video_token_id=REAL_IDS["<|video_pad|>"],
        vision_start_token_id=REAL_IDS["<|vision_start|>"], vision_end_token_id=REAL_IDS["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3, **SMALL).save_pretrained(folder)
    return str(folder)


def reference_embeddings(folder: str, inputs: list[tuple], side: str, shift: int = 0,
                         system: str = SYSTEM) -> torch.Tensor:
    """Qwen3-VL-Embedding's steps by hand (QwenLM/Qwen3-VL-Embedding @ 8ce3aab
    ``src/models/qwen3_vl_embedding.py``; research note sec. 1.2/1.4): the chat template rendered with the
    default instruction as the system message, the user turn [image][text], the generation prompt and the
    appended ``<|endoftext|>``; tokenized with ``side`` padding; ``Qwen3VLModel`` (transformers' own position
    ids from ``mm_token_type_ids``); the last non-pad token (``_pooling_last``: flip-argmax of the mask) ``-
    shift``; L2. ``inputs``: (text or None, image or None)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLModel

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = side
    model = Qwen3VLModel.from_pretrained(folder).eval()
    images = [img for _, img in inputs if img is not None]
    vision = dict(Qwen2VLImageProcessorPil.from_pretrained(folder, **SMALL)(images=images, return_tensors="pt")) \
        if images else {}
    counts = iter((vision["image_grid_thw"].prod(-1) // 4).tolist() if images else [])
    texts = []
    for text, img in inputs:
        content = ("<|vision_start|>" + "<|image_pad|>" * next(counts) + "<|vision_end|>" if img else "") + (text or "")
        texts.append(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
                     "<|im_start|>assistant\n<|endoftext|>")
    enc = tok(texts, padding=True, return_tensors="pt")
    types = (enc["input_ids"] == REAL_IDS["<|image_pad|>"]).int()
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], mm_token_type_ids=types,
                       **vision).last_hidden_state
    mask = enc["attention_mask"]
    last = mask.shape[1] - mask.flip(1).argmax(1) - 1 - shift
    return torch.nn.functional.normalize(hidden[torch.arange(len(inputs)), last], dim=-1)


def test_qwen3_vl_embedding_recipe_equals_the_reference_embedder(released):
    """Text, image and image+text through ``recipes/qwen3_vl_embedding.yaml`` (weights from the released
    layout) equal the reference's steps <= 1e-5, left and right padding, batch 1 and 5; pooling the token
    before the appended ``<|endoftext|>`` does not."""
    from embedkit.config.loader import compose
    from embedkit.encoder import Encoder

    cfg = compose(["recipe=qwen3_vl_embedding", f"model.backbone.path={released}", "model.backbone.dtype=float32",
                   "model.backbone.min_pixels=1024", "model.backbone.max_pixels=9216"])
    encoder = Encoder.from_config(cfg["model"]).eval()
    tokenizer = encoder.backbone.tokenizer
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == REAL_IDS["<|endoftext|>"]
    pictures = images(3, 11)
    inputs = [("a red circle at the top", None), (None, pictures[0]), ("a photo of a cat", pictures[1]),
              ("two", None), ("what is in this image?", pictures[2])]
    items = [Item(text=text, images=[img] if img else []) for text, img in inputs]
    with torch.no_grad():
        ours = encoder(encoder.processor()(items))
        alone = torch.cat([encoder(encoder.processor()([it])) for it in items])
    chunk = encoder.processor()(items[:1])
    assert chunk["input_ids"][0, chunk["attention_mask"][0].sum() - 1] == REAL_IDS["<|endoftext|>"]
    assert tokenizer.convert_ids_to_tokens(chunk["input_ids"][0, -3:]) == ["assistant", NEWLINE, "<|endoftext|>"]
    for side in ("right", "left"):
        ref = reference_embeddings(released, inputs, side)
        assert (ours - ref).abs().max() <= 1e-5, side
        assert (alone - ref).abs().max() <= 1e-5, side
        for i, one in enumerate(inputs):  # batch 1
            assert (alone[i] - reference_embeddings(released, [one], side)[0]).abs().max() <= 1e-5
    before = reference_embeddings(released, inputs, "right", shift=1)  # the token before the appended one
    assert (ours - before).abs().max() > 1e-2


def test_gradients_reach_the_tower_and_deepstack_and_checkpointing_keeps_them():
    """A mixed chunk with a trainable tower: the tower and the deepstack mergers get gradients, and
    activation checkpointing gives the same gradients."""
    grads = []
    for checkpointing in (False, True):
        backbone = Qwen3VLBackbone(seed=0, tiny=True, freeze_vision=False, gradient_checkpointing=checkpointing,
                                   **PIXELS)
        backbone.model.config.text_config.attention_dropout = 0.0
        named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
        out = backbone(backbone.make_processor()(ITEMS["mixed"]))
        grads.append(dict(zip([n for n, _ in named], torch.autograd.grad(out.hidden.pow(2).sum(),
                                                                          [p for _, p in named]))))
    plain, checkpointed = grads
    assert any(g.abs().sum() > 0 for n, g in plain.items() if n.startswith("model.visual.deepstack_merger_list."))
    assert any(g.abs().sum() > 0 for n, g in plain.items() if n.startswith("model.visual.blocks."))
    assert max((plain[n] - checkpointed[n]).abs().max().item() for n in plain) <= 1e-5

def test_queries_get_the_instruction_and_documents_the_default(released):
    """Qwen3-VL-Embedding's sides (README L171-174, embedding.ipynb cells 11, 16): a query's system message is
    its task instruction (``system_prompt``), a document's the default (``candidate_system_prompt``, the
    recipe's); ``side=candidate`` frames documents so, and the wrong side's frame does not match."""
    from embedkit.config.loader import compose
    from embedkit.encoder import Encoder

    instruction = "find a photo of a cat."
    cfg = compose(["recipe=qwen3_vl_embedding", f"model.backbone.path={released}", "model.backbone.dtype=float32",
                   "model.backbone.min_pixels=1024", "model.backbone.max_pixels=9216",
                   f"model.backbone.system_prompt={instruction}"])
    encoder = Encoder.from_config(cfg["model"]).eval()
    inputs = [("a red circle at the top", None), (None, images(1, 5)[0]), ("two", None)]
    texts, pictures = [t for t, _ in inputs], [im for _, im in inputs]
    queries = encoder.encode(texts=texts, images=pictures, side="query")
    documents = encoder.encode(texts=texts, images=pictures, side="candidate")
    for padding in ("right", "left"):
        assert (queries - reference_embeddings(released, inputs, padding, system=instruction)).abs().max() <= 1e-5
        assert (documents - reference_embeddings(released, inputs, padding)).abs().max() <= 1e-5
    assert (documents - reference_embeddings(released, inputs, "right", system=instruction)).abs().max() > 1e-3


#: the Qwen3-VL-Embedding conventions and fine-tuning values, with their sources (research note sec. 1),
#: kept apart from the recipe files so a recipe edit that drifts from a source fails here
EMB = "QwenLM/Qwen3-VL-Embedding@8ce3aab src/models/qwen3_vl_embedding.py"
TR = "Qwen3-VL-Embedding technical report"
SOURCED = {
    "qwen3_vl_embedding": [
        ("model.backbone.name", "qwen3_vl", "TR sec. 4.2: Qwen3-VL"),
        ("model.backbone.prompt", "chat", EMB + " L330-332"),
        ("model.backbone.system_prompt", "Represent the user's input.", EMB + " L170"),
        ("model.backbone.candidate_system_prompt", "Represent the user's input.", "embedding.ipynb cells 11, 16"),
        ("model.backbone.append_eos", True, TR + " p.4"), ("model.backbone.append_token", "<|endoftext|>", TR + " p.4"),
        ("model.backbone.min_pixels", 4 * 32 * 32, EMB + " L24-33"),
        ("model.backbone.max_pixels", 1800 * 32 * 32, EMB + " L24-33"),
        ("model.backbone.video_max_pixels", 768 * 32 * 32, EMB + " L24-33"),
        ("model.backbone.video_total_pixels", 10 * 768 * 32 * 32, EMB + " L24-33"),
        ("model.backbone.max_length", 8192, EMB + " L24-33"),
        ("model.pooling.name", "last_token", EMB + " L364-370"), ("model.normalize", True, EMB + " L389-391"),
        ("data.video.num_frames", 64, EMB + " MAX_FRAMES"), ("data.video.fps", 1.0, EMB + " FPS"),
    ],
    "qwen3vl_embedding_2b_ft": [
        ("model.lora.enabled", True, TR + " sec. 4.2"), ("model.lora.r", 32, "README L70-75"),
        ("model.lora.alpha", 32, "README L70-75"),
        ("loss.name", "matryoshka", TR + " sec. 5.1.1"), ("loss.inner.name", "infonce", TR + " sec. 5.1"),
        ("loss.dims", [2048, 1536, 1024, 512, 256, 128, 64], "HF blog train-multimodal-sentence-transformers"),
        ("train.false_negative_margin", -0.1, TR + " sec. 5.1: s_ij > s(q, d+) + 0.1"),
        ("train.mask_duplicates", True, TR + " sec. 5.1: d_j = d+"),
        ("train.global_batch_size", 64, "HF blog"), ("train.lr", 2e-5, "HF blog"),
    ],
}


def _get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.parametrize("name", list(SOURCED))
def test_recipes_carry_the_sourced_values(name):
    from embedkit.config.loader import compose

    cfg = compose([f"recipe={name}"])
    wrong = [f"{key}={_get(cfg, key)!r}, source says {value!r} ({source})"
             for key, value, source in SOURCED[name] if _get(cfg, key) != value]
    assert not wrong, "\n".join(wrong)
    if name.endswith("_ft"):  # the README's targets: no o_proj, no vision module
        target = cfg["model"]["lora"]["target"]
        assert "o_proj" not in target and target.startswith("^model\\.language_model\\.")


@pytest.mark.parametrize("merge", [True, False])
def test_export_loads_back_equal_with_the_chat_prompt(merge, tmp_path):
    """A trained qwen3_vl run with LoRA and Qwen3-VL-Embedding's prompt keys, exported (adapter merged or
    not) and loaded back with ``embedkit.load``: the same embeddings for text, image and image+text."""
    import embedkit
    from embedkit.export.writer import export_model
    from tests.export.test_export import assert_equal_embeddings, reference, trained_run

    run, module = trained_run(tmp_path, [
        "model.backbone=qwen3_vl", "model.backbone.tiny=true", "model.backbone.prompt=chat",
        "model.backbone.append_token=<|endoftext|>", "model.backbone.min_pixels=1024",
        "model.backbone.max_pixels=16384", "model.lora.enabled=true"])
    pictures = images(2, 21)
    items = [Item(text="a red circle"), Item(images=[pictures[0]]), Item(text="a cat", images=[pictures[1]])]
    ref = reference(module, items)
    out = export_model(run, tmp_path / "export", merge_lora=merge, log=lambda m: None)
    encoder = embedkit.load(out)
    assert encoder.backbone.system == SYSTEM and encoder.processor().end == "<|endoftext|>"
    assert_equal_embeddings(encoder, items, ref)


def test_bidirectional_attention_lets_a_later_token_change_an_early_state():
    """``attention=bidirectional`` (set_attention) on Qwen3-VL's language model, image chunks padded:
    an early state depends on a later token only when bidirectional."""
    picture = images(1, 31)[0]
    a, b = (Item(text=t, images=[picture]) for t in ("a red circle at the top left", "a red circle at the top right"))
    pad = Item(text="a")
    for attention, changes in (("causal", False), ("bidirectional", True)):
        backbone = Qwen3VLBackbone(seed=0, tiny=True, attention=attention, **PIXELS).eval()
        with torch.no_grad():
            ha, hb = (backbone(backbone.make_processor()([x, pad])).hidden[0] for x in (a, b))
        assert ((ha[0] - hb[0]).abs().max().item() > 1e-4) == changes, attention
