"""Golden parity with the released embedders (issue 29): GME-Qwen2-VL and VLM2Vec-V2.0 on the qwen2_vl family,
LLaVE (text) on llava_onevision; and each released-embedder recipe's tiny form trains on the demo.

Each test writes a tiny random model in the released on-disk layout (``Qwen2VLForConditionalGeneration``
``config.json`` and ``model.safetensors`` with the transformers < 4.52 key names the releases carry:
``model.layers.*``, ``visual.*``, ``lm_head.weight``; a tokenizer with Qwen2-VL's special tokens, pad
``<|endoftext|>`` and EOS ``<|im_end|>`` as in Qwen2-VL-Instruct; VLM2Vec-V2.0: the base plus a PEFT DoRA
adapter folder naming it), loads it through the shipped recipe with ``model.backbone.path=``, and compares
embedkit's embeddings of text, image and image+text with a reference computed step by step as the authors'
code does: the prompt rendered by hand, tokenized (left and right padding; batch sizes 1 and 5), the image
pads expanded to the processor's count, transformers' own ``Qwen2VLForConditionalGeneration`` run on it, the
documented position pooled, L2-normalised. Sources of each convention: docs/released-embedders.md.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from embedkit.config.loader import compose
from embedkit.data.schema import Item
from embedkit.encoder import Encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOL = 1e-5
PIXELS = 28 * 28 * 4  # every test image to 56 x 56 px: 4 merged image tokens
VS, VE, IMG, VID = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
START, END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIALS = [ENDOFTEXT, START, END, VS, VE, IMG, VID]
WORDS = ["\n", " ", "system", "user", "assistant", "you", "are", "a", "helpful", ".", "find", "an", "image", "that",
         "matches", "the", "given", "text", "red", "green", "circle", "square", "photo", "of", "cat",
         "represent", "with", "following", "question", ":", "what", "is", "in", "describe", "query", "passage"]
GME_QUERY_SYSTEM = "Find an image that matches the given text."  # GME's query example (gme_inference.py)


def _image(w, h, colour):
    img = Image.new("RGB", (w, h), colour)
    for x in range(0, w, 7):
        for y in range(0, h, 5):
            img.putpixel((x, y), ((x * 13) % 256, (y * 7) % 256, 90))
    return img


#: (text, image): text, image, image+text, and two more to make 5 of different lengths
INPUTS = [
    ("a red circle", None),
    (None, _image(56, 40, (200, 30, 30))),
    ("a photo of a cat", _image(84, 60, (10, 10, 220))),
    ("what is in the image ?", _image(30, 90, (20, 200, 30))),
    ("a green square", None),
]


def released_tokenizer():
    """A word-level tokenizer with Qwen2-VL-Instruct's special tokens (pad <|endoftext|>, EOS <|im_end|>) and
    "\\n" and " " as tokens of their own, so a frame with a wrong newline, space or marker tokenizes
    differently (as it does with Qwen's byte-level BPE)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ["<unk>"] + WORDS)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.Split(" ", behavior="isolated"),
        pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=ENDOFTEXT, eos_token=END, unk_token="<unk>",
                                   additional_special_tokens=[t for t in SPECIALS if t not in (ENDOFTEXT, END)])


def write_released_qwen2vl(root) -> None:
    """A tiny random Qwen2-VL-Instruct checkpoint in the released layout (weights off their init)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = released_tokenizer()
    ids = tok.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=ids(ENDOFTEXT), eos_token_id=ids(END), bos_token_id=ids(ENDOFTEXT),
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids(IMG), video_token_id=ids(VID), vision_start_token_id=ids(VS), vision_end_token_id=ids(VE))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(str(root))
    keys = set(load_file(str(root / "model.safetensors")))
    # the released key names (Qwen2-VL-2B-Instruct, GME: saved by transformers < 4.52)
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "visual.patch_embed.proj.weight", "visual.merger.mlp.0.weight"} <= keys
    tok.save_pretrained(str(root))
    Qwen2VLImageProcessorPil(min_pixels=PIXELS, max_pixels=PIXELS).save_pretrained(str(root))


# -- the reference: the authors' steps, by hand --------------------------------------------------------------


def reference(model, root, prompts: list[str], images: list, padding_side: str, pool_offset: int = 0):
    """Embeddings of rendered prompts (each holding one ``<|image_pad|>`` per image, expanded here as
    Qwen2VLProcessor does: grid_t * grid_h * grid_w / merge^2 copies), ``padding_side`` padding, the last
    real token's state (``pool_offset`` tokens before it: a wrong convention), L2-normalised."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(str(root))
    tok.padding_side = padding_side
    batch = {}
    if any(im is not None for im in images):
        vision = Qwen2VLImageProcessorPil.from_pretrained(str(root))(
            images=[im for im in images if im is not None], return_tensors="pt")
        batch = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
        counts = iter((vision["image_grid_thw"].prod(-1) // 4).tolist())
        prompts = [p.replace(IMG, IMG * next(counts)) if IMG in p else p for p in prompts]
    enc = tok(prompts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    types = (ids == tok.convert_tokens_to_ids(IMG)).int()
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False,
                             **batch).last_hidden_state
    if padding_side == "left":  # GME: left padding, index -1
        last = hidden[:, -1 - pool_offset]
    else:  # mask.sum - 1
        last = hidden[torch.arange(len(prompts)), mask.sum(1) - 1 - pool_offset]
    return torch.nn.functional.normalize(last, dim=-1)


def reference_all(model, root, render, padding_side: str, batch_size: int, pool_offset: int = 0):
    out = []
    for i in range(0, len(INPUTS), batch_size):
        chunk = INPUTS[i: i + batch_size]
        out.append(reference(model, root, [render(t, im) for t, im in chunk], [im for _, im in chunk],
                             padding_side, pool_offset))
    return torch.cat(out)


def embedkit_encoder(recipe: str, path, *extra: str) -> Encoder:
    cfg = compose([f"recipe={recipe}", f"model.backbone.path={path}", "model.backbone.dtype=float32",
                   f"model.backbone.min_pixels={PIXELS}", f"model.backbone.max_pixels={PIXELS}", *extra])
    return Encoder.from_config(cfg["model"], seed=0).eval()


def embedkit_all(recipe: str, path, batch_size: int, *extra: str, side: str | None = None) -> torch.Tensor:
    encoder = embedkit_encoder(recipe, path, *extra)
    return encoder.encode(texts=[t for t, _ in INPUTS], images=[im for _, im in INPUTS], batch_size=batch_size,
                          side=side)


def assert_parity(ours: torch.Tensor, want: torch.Tensor) -> None:
    assert ours.shape == want.shape
    assert (ours - want).abs().max().item() <= TOL


# -- GME ------------------------------------------------------------------------------------------------------


def gme_prompt(system: str):
    """GME's rendering (gme_inference.py; ms-swift GMETemplate): chat template, image before text,
    generation prompt, then <|endoftext|>."""
    def render(text, image):
        content = (VS + IMG + VE if image is not None else "") + (text or "")
        return (f"{START}system\n{system}{END}\n{START}user\n{content}{END}\n{START}assistant\n{ENDOFTEXT}")
    return render


@pytest.fixture(scope="module")
def gme(tmp_path_factory):
    from transformers import Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("gme")
    write_released_qwen2vl(root)
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(str(root), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return root, model.eval()


@pytest.mark.parametrize("system", ["You are a helpful assistant.", GME_QUERY_SYSTEM])
def test_gme_matches_the_released_convention(gme, system):
    root, model = gme
    extra = [] if system.startswith("You") else [f"model.backbone.system_prompt={system}"]
    ours = {bs: embedkit_all("gme_qwen2_vl", root, bs, *extra) for bs in (1, 5)}
    for side in ("left", "right"):
        for bs in (1, 5):
            want = reference_all(model, root, gme_prompt(system), side, bs)
            assert_parity(ours[1], want)
            assert_parity(ours[5], want)
    # a wrong convention fails: the token before the appended one (<|im_end|>... "\n"), or no system message
    want = reference_all(model, root, gme_prompt(system), "right", 5)
    assert (reference_all(model, root, gme_prompt(system), "right", 5, pool_offset=1) - want).abs().max() > 1e-3
    other = gme_prompt("You are a helpful assistant." if system != "You are a helpful assistant." else "find")
    assert (reference_all(model, root, other, "right", 5) - want).abs().max() > 1e-3


GME_DEFAULT = "You are a helpful assistant."


def test_gme_frames_queries_and_candidates_apart(gme):
    """GME's sides (gme_inference.py ``embed``: ``if not is_query or instruction is None: instruction =
    default``): a query's system message is its instruction, a candidate's always "You are a helpful
    assistant.". With ``system_prompt=<instruction>`` the query side (``side=query``, or no side) and the
    candidate side (``side=candidate``: ``candidate_system_prompt``) each equal GME's reference; the wrong
    side convention (the instruction on a candidate, the default on a query) does not."""
    root, model = gme
    extra = f"model.backbone.system_prompt={GME_QUERY_SYSTEM}"
    queries = {bs: embedkit_all("gme_qwen2_vl", root, bs, extra, side="query") for bs in (1, 5)}
    cands = {bs: embedkit_all("gme_qwen2_vl", root, bs, extra, side="candidate") for bs in (1, 5)}
    for padding in ("left", "right"):
        for bs in (1, 5):
            assert_parity(queries[bs], reference_all(model, root, gme_prompt(GME_QUERY_SYSTEM), padding, bs))
            assert_parity(cands[bs], reference_all(model, root, gme_prompt(GME_DEFAULT), padding, bs))
    assert_parity(embedkit_all("gme_qwen2_vl", root, 5, extra), queries[5])  # no side: the query side
    # the wrong side convention fails: the candidates framed as queries, or the queries as candidates
    assert (cands[5] - reference_all(model, root, gme_prompt(GME_QUERY_SYSTEM), "right", 5)).abs().max() > 1e-3
    assert (queries[5] - reference_all(model, root, gme_prompt(GME_DEFAULT), "right", 5)).abs().max() > 1e-3


def test_training_batches_frame_each_side(gme):
    """``ChunkCollate`` processes the queries for the query side and the candidates for the candidate side,
    and validation chunks one role each (``ValItems(chunk_size)``): the rendered system messages show it."""
    from embedkit.data.batch import ChunkCollate, ValCollate, ValItems
    from embedkit.data.schema import Example

    root, _ = gme
    encoder = embedkit_encoder("gme_qwen2_vl", root, f"model.backbone.system_prompt={GME_QUERY_SYSTEM}")
    tok = encoder.backbone.tokenizer
    examples = [Example(Item(t or "x", im), Item("a red circle"), [Item("a green square")]) for t, im in INPUTS]

    def systems(chunk) -> set:
        texts = ["".join(tok.convert_ids_to_tokens(row)) for row in chunk["input_ids"].tolist()]
        return {t.split("system\n")[1].split(END)[0] for t in texts}

    batch = ChunkCollate(encoder.processor(), chunk_size=2, num_negatives=1, sort=True)(examples)
    assert set.union(*map(systems, batch.query_chunks)) == {GME_QUERY_SYSTEM.lower()}
    assert set.union(*map(systems, batch.candidate_chunks)) == {GME_DEFAULT.lower()}
    rows = ValItems(examples, chunk_size=3)
    collate = ValCollate(encoder.processor())
    for chunk in rows:
        roles, _, inputs = collate(chunk)
        want = GME_QUERY_SYSTEM if roles[0] == 0 else GME_DEFAULT
        assert len(set(roles.tolist())) == 1 and systems(inputs) == {want.lower()}


def test_gme_without_the_appended_token_is_not_gme(gme):
    """``append_token`` matters: the tokenizer's EOS (<|im_end|>) in its place moves every embedding."""
    root, model = gme
    want = reference_all(model, root, gme_prompt("You are a helpful assistant."), "right", 5)
    ours = embedkit_all("gme_qwen2_vl", root, 5, "model.backbone.append_token=null")
    assert (ours - want).abs().max() > 1e-3


# -- VLM2Vec-V2.0 -----------------------------------------------------------------------------------------------

#: the LoRA targets VLM2Vec-V2's adapter_config lists (name suffixes; these hit only the language model)
V2_TARGETS = ["q_proj", "v_proj", "down_proj"]


def vlm2vec_prompt(text, image):
    """VLM2Vec-V2 (src/model/processor.py, demo_v2_image.py): "<|image_pad|> {text}", no chat template, no
    vision markers, nothing appended."""
    if image is None:
        return text
    return IMG + (" " + text if text else "")


def write_vlm2vec_adapter(base_model, base_root, root):
    """The DoRA adapter as VLM2Vec's PeftModel.save_pretrained writes it (``base_model.model.<key of the
    transformers < 4.52 Qwen2VLForConditionalGeneration>``), random and non-zero; returns the adapted model
    (the adapter applied by PEFT, unmerged: the reference)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=64, lora_dropout=0.1, use_dora=True, init_lora_weights="gaussian",
                        target_modules=V2_TARGETS)
    adapted = inject_adapter_in_model(config, copy.deepcopy(base_model))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tensors = {}
    for key, t in get_peft_model_state_dict(adapted).items():
        assert key.startswith("model.language_model.")  # no vision module matched
        tensors["base_model.model.model." + key[len("model.language_model."):]] = t.contiguous()
    root.mkdir()
    save_file(tensors, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(base_root), "r": 4, "lora_alpha": 64,
        "lora_dropout": 0.1, "use_dora": True, "init_lora_weights": "gaussian", "bias": "none",
        "target_modules": V2_TARGETS, "task_type": None}))
    return adapted.eval()


@pytest.fixture(scope="module")
def vlm2vec(tmp_path_factory, gme):
    root, base_model = gme  # the base: Qwen2-VL-Instruct in the released layout
    adapter = tmp_path_factory.mktemp("vlm2vec") / "VLM2Vec-V2.0"
    return adapter, root, write_vlm2vec_adapter(base_model, root, adapter)


def test_vlm2vec_v2_matches_the_released_convention(vlm2vec):
    adapter, root, model = vlm2vec
    ours = {bs: embedkit_all("vlm2vec_v2", adapter, bs) for bs in (1, 5)}
    for side in ("left", "right"):
        for bs in (1, 5):
            want = reference_all(model, root, vlm2vec_prompt, side, bs)
            assert_parity(ours[1], want)
            assert_parity(ours[5], want)
    want = reference_all(model, root, vlm2vec_prompt, "right", 5)
    # a wrong convention fails: the token before the last, the vision markers around the pads, or the base
    # without the adapter
    assert (reference_all(model, root, vlm2vec_prompt, "right", 5, pool_offset=1) - want).abs().max() > 1e-3
    marked = embedkit_all("vlm2vec_v2", adapter, 5, "model.backbone.prompt=none")
    assert (marked[1:4] - want[1:4]).abs().max() > 1e-3
    base = embedkit_all("vlm2vec_v2", root, 5)
    assert (base - want).abs().max() > 1e-3


def test_vlm2vec_v2_video_is_bare_video_pads(vlm2vec):
    """A video is its <|video_pad|> tokens alone, then " {text}" (VLM2Vec-V2's video prompt)."""
    from embedkit.backbones.qwen2_vl import Qwen2VLBackbone
    from embedkit.data.schema import Frames

    adapter, _, _ = vlm2vec
    backbone = Qwen2VLBackbone(seed=0, path=str(adapter), prompt="bare", append_eos=False,
                               min_pixels=PIXELS, max_pixels=PIXELS)
    frames = Frames(images=[_image(56, 56, (9, 9, 9))] * 2, timestamps=None, indices=[0, 1], source_frames=2)
    processor = backbone.make_processor()
    item = Item(text="a red circle", video=frames)
    out = processor([item])
    tokens = backbone.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())
    assert tokens == [VID] * 4 + [" ", "a", " ", "red", " ", "circle"]
    assert processor.num_tokens(item) == len(tokens)


# -- jina-embeddings-v4 (single vector, retrieval adapter merged) -------------------------------------------------

JINA_TEXTS = ["a red circle", "a photo of a cat", "what is in the image ?", "a green square", "two"]
JINA_IMAGES = [_image(56, 40, (200, 30, 30)), _image(84, 60, (10, 10, 220)), _image(30, 90, (20, 200, 30)),
               _image(56, 56, (90, 90, 90)), _image(120, 40, (250, 250, 0))]
JINA_IMAGE_PROMPT = f"{START}user\n{VS}{IMG}{VE}Describe the image.{END}\n"  # jina's processor (PREFIX_DICT row)


@pytest.fixture(scope="module")
def jina(tmp_path_factory):
    """A tiny random Qwen2.5-VL in the transformers layout jina_v4's ``path`` names (the release with its
    retrieval adapter merged: ``Qwen2_5_VLForConditionalGeneration``), Qwen2-VL's special tokens."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    root = tmp_path_factory.mktemp("jina")
    tok = released_tokenizer()
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=ids(ENDOFTEXT), eos_token_id=ids(END), bos_token_id=ids(ENDOFTEXT),
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=ids(IMG), video_token_id=ids(VID), vision_start_token_id=ids(VS), vision_end_token_id=ids(VE))
    torch.manual_seed(1)
    model = Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(str(root))
    tok.save_pretrained(str(root))
    Qwen2VLImageProcessorPil(min_pixels=PIXELS, max_pixels=PIXELS).save_pretrained(str(root))
    return root, model.eval()


def jina_reference(model, root, texts: list[str] | None, images: list | None, padding_side: str,
                   span: bool = True) -> torch.Tensor:
    """jina-v4's single vector by its steps (HF jinaai/jina-embeddings-v4 ``get_single_vector_embeddings``; one
    modality per batch): a text batch mean-pooled over ``attention_mask``; an image batch rendered as
    ``JINA_IMAGE_PROMPT`` (the pad expanded to the processor's count) and mean-pooled over the positions from
    each row's ``<|vision_start|>`` to its ``<|vision_end|>``, both included (``span=False``: over the whole
    mask, a wrong convention); L2."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(str(root))
    tok.padding_side = padding_side
    batch = {}
    if images:
        vision = Qwen2VLImageProcessorPil.from_pretrained(str(root))(images=images, return_tensors="pt")
        batch = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
        texts = [JINA_IMAGE_PROMPT.replace(IMG, IMG * n) for n in (vision["image_grid_thw"].prod(-1) // 4).tolist()]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == tok.convert_tokens_to_ids(
            IMG)).int(), use_cache=False, **batch).last_hidden_state
    weights = mask.bool()
    if images and span:
        start = torch.where(ids == tok.convert_tokens_to_ids(VS))[1].unsqueeze(1)
        end = torch.where(ids == tok.convert_tokens_to_ids(VE))[1].unsqueeze(1)
        at = torch.arange(ids.shape[1]).expand_as(ids)
        weights = (at >= start) & (at <= end)
    pooled = (hidden * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


def jina_reference_all(model, root, padding_side: str, batch_size: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(query texts "Query: {text}", images), each in batches of ``batch_size``."""
    cut = range(0, 5, batch_size)
    texts = torch.cat([jina_reference(model, root, ["Query: " + t for t in JINA_TEXTS[i: i + batch_size]], None,
                                      padding_side, **kw) for i in cut])
    images = torch.cat([jina_reference(model, root, None, JINA_IMAGES[i: i + batch_size], padding_side, **kw)
                        for i in cut])
    return texts, images


def test_jina_v4_matches_the_released_convention(jina):
    """Text ("Query: " prefix, mean over the mask) and image (jina's frame, mean over the vision block)
    through ``recipes/jina_v4.yaml`` equal jina's steps <= 1e-5, left and right padding, batch sizes 1 and 5;
    a mixed batch gives each row its own rule (jina: row 0's); the whole-mask mean for images does not match."""
    root, model = jina
    encoder = embedkit_encoder("jina_v4", root, "model.lora.enabled=false")
    ours = {bs: (encoder.encode(texts=JINA_TEXTS, instruction="Query: ", batch_size=bs),
                 encoder.encode(images=JINA_IMAGES, batch_size=bs)) for bs in (1, 5)}
    for padding in ("left", "right"):
        for bs in (1, 5):
            want_text, want_image = jina_reference_all(model, root, padding, bs)
            assert_parity(ours[bs][0], want_text)
            assert_parity(ours[bs][1], want_image)
    mixed = encoder.encode([Item("Query: " + JINA_TEXTS[0]), Item(image=JINA_IMAGES[0]), Item("Query: " + JINA_TEXTS[1])])
    assert_parity(mixed, torch.stack([ours[5][0][0], ours[5][1][0], ours[5][0][1]]))
    # a wrong convention fails: the image rows averaged over every real token of jina's frame
    _, whole = jina_reference_all(model, root, "right", 5, span=False)
    assert (ours[5][1] - whole).abs().max() > 1e-3
    processor = encoder.processor()
    tokens = encoder.backbone.tokenizer.convert_ids_to_tokens(processor([Item(image=JINA_IMAGES[3])])["input_ids"][0])
    assert "".join(tokens).lower() == JINA_IMAGE_PROMPT.replace(IMG, IMG * 4).lower()
    assert processor.num_tokens(Item(image=JINA_IMAGES[3])) == len(tokens)


def test_vision_span_pooling_needs_a_backbone_that_marks_it():
    from embedkit.errors import UserError

    with pytest.raises(UserError, match="model.pooling.span: vision needs a backbone that marks vision blocks"):
        Encoder.from_config(compose(["model.backbone=hf_text", "model.backbone.tiny=true",
                                     "model.pooling.name=mean", "model.pooling.span=vision"])["model"])


# -- configuration errors -----------------------------------------------------------------------------------------


def test_prompt_layout_errors_are_one_line(gme):
    from embedkit.backbones.qwen2_vl import Qwen2VLBackbone

    root, _ = gme
    with pytest.raises(ValueError, match="append_token: set, but append_eos is false"):
        Qwen2VLBackbone.check_config({"append_token": ENDOFTEXT, "append_eos": False})
    with pytest.raises(ValueError, match=re.escape("the tokenizer has no token '<|nope|>'")):
        Qwen2VLBackbone(seed=0, path=str(root), append_token="<|nope|>")
    # through the config: one line naming the key
    from embedkit.errors import ConfigError

    with pytest.raises(ConfigError, match="model.backbone.prompt: 'chatty' is not accepted; choices: none, chat, bare"):
        compose(["recipe=gme_qwen2_vl", "model.backbone.prompt=chatty"])
    with pytest.raises(ConfigError, match="model.backbone.append_token: set, but append_eos is false"):
        compose(["recipe=gme_qwen2_vl", "model.backbone.append_eos=false"])


# -- the recipes: each resolves, and its tiny form trains on the demo data ------------------------------------------

RECIPES = ["gme_qwen2_vl", "vlm2vec_v2", "llave", "gme_2b_ft", "vlm2vec_v2_2b_ft"]
#: the demo at test size (the README's line is `embedkit fit recipe=NAME model.backbone.tiny=true
#: ~model.backbone.path data.demo.enabled=true trainer.max_steps=3 trainer.max_epochs=0`)
SMALL = ["model.backbone.tiny=true", "~model.backbone.path", "data.demo.enabled=true", "trainer.max_steps=3",
         "trainer.max_epochs=0", "train.global_batch_size=8", "train.chunk_size=4", "train.accumulate_steps=1",
         "data.demo.train_size=64", "data.demo.val_size=8", "data.demo.holdout_combinations=4",
         "data.train.shuffle_buffer=16", "data.train.num_workers=0", "tracking.enabled=false",
         "model.backbone.dtype=float32", "trainer.precision=32"]
QWEN_SMALL = [f"model.backbone.min_pixels={PIXELS}", f"model.backbone.max_pixels={PIXELS}"]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # the demo data drawn once for all recipes


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_tiny_trains_on_the_demo(recipe, demo_cache, tmp_path, monkeypatch):
    from embedkit.cli import main as cli_main

    monkeypatch.setenv("EMBEDKIT_CACHE", str(demo_cache))
    monkeypatch.chdir(tmp_path)
    extra = [] if recipe == "llave" else QWEN_SMALL
    assert cli_main(["fit", f"recipe={recipe}", *SMALL, *extra, f"run.dir={tmp_path / 'run'}"]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert any("lora_A" in k for k in ckpt["state_dict"]) == recipe.endswith("_ft")


# -- LLaVE (text only) ------------------------------------------------------------------------------------------

LLAVE_SYSTEM = "You are a helpful assistant."


def llave_prompt(text: str) -> str:
    """LLaVE's preprocess_qwen (DeepLearnXMU/LLaVE @ 2c23053 llava/train/train.py): the chat template with an
    assistant turn of a lone "\\n"; the final "\\n" after the last <|im_end|> is pooled."""
    return f"{START}system\n{LLAVE_SYSTEM}{END}\n{START}user\n{text}{END}\n{START}assistant\n\n{END}\n"


@pytest.fixture(scope="module")
def llave(tmp_path_factory):
    """(the source LLaVA-OneVision, the folder): a tiny LLaVA-OneVision moved off its init and written in LLaVE's
    llava_qwen layout."""
    from embedkit.backbones.checkpoints.llava_qwen import SIGLIP_MEAN, SIGLIP_STD
    from embedkit.backbones.llava_onevision import LlavaOnevision, anyres_pinpoints
    from tests.backbones.test_checkpoint_layouts import write_llava_qwen

    source = LlavaOnevision(seed=0, tiny=True)
    source.image_processor.image_mean, source.image_processor.image_std = list(SIGLIP_MEAN), list(SIGLIP_STD)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    # LLaVE's grids: 1x1 .. 2x2 tiles (its training script's image_grid_pinpoints; recipes/llave.yaml max_grid 2)
    config = source.model.config
    config.image_grid_pinpoints = anyres_pinpoints(config.vision_config.image_size, 2)
    source.image_processor.image_grid_pinpoints = config.image_grid_pinpoints
    folder = tmp_path_factory.mktemp("llave") / "LLaVE-2B"
    write_llava_qwen(source, folder)
    return source, folder


def llave_encoder(folder) -> Encoder:
    cfg = compose(["recipe=llave", f"model.backbone.path={folder}", "model.backbone.dtype=float32"])
    return Encoder.from_config(cfg["model"], seed=0).eval()


def test_llave_text_matches_the_released_convention(llave):
    """A tiny LLaVA-OneVision written in LLaVE's llava_qwen layout, loaded by ``recipe=llave``: text embeddings
    equal the transformers model's state at the final "\\n" of the hand-rendered prompt, L2-normalised."""
    source, folder = llave
    texts = [t for t, _ in INPUTS if t is not None]
    encoder = llave_encoder(folder)
    ours = {bs: encoder.encode(texts=texts, batch_size=bs) for bs in (1, 5)}
    tok, model = source.tokenizer, source.model.eval()

    def reference(side: str, offset: int = 0) -> torch.Tensor:
        tok.padding_side = side
        enc = tok([llave_prompt(t) for t in texts], padding=True, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hidden = model(**enc, use_cache=False).last_hidden_state
        index = enc["attention_mask"].sum(1) - 1 - offset if side == "right" else torch.full((len(texts),), -1 - offset)
        return torch.nn.functional.normalize(hidden[torch.arange(len(texts)), index], dim=-1)

    try:
        for side in ("left", "right"):
            assert_parity(ours[1], reference(side))
            assert_parity(ours[5], reference(side))
        assert (reference("right", offset=1) - reference("right")).abs().max() > 1e-3
    finally:
        tok.padding_side = "right"


def llava_onevision_processor(source):
    """transformers' ``LlavaOnevisionProcessor`` (its AnyRes token count and ``<image>`` expansion) over the
    PIL image processor with LLaVE's SigLIP settings (tile = the tower's image size, mean = std = 0.5, the
    checkpoint's grid pinpoints), its video processor left out: the class insists on a torchvision one, and
    torchvision does not import beside this CPU torch (``NoVideo`` accepts None; images need none)."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    class NoVideo(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    cfg = source.model.config
    tile, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    images = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3, image_grid_pinpoints=cfg.image_grid_pinpoints)
    return NoVideo(image_processor=images, tokenizer=source.tokenizer, video_processor=None,
                   num_image_tokens=(tile // patch) ** 2, vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                   vision_aspect_ratio=cfg.vision_aspect_ratio)


def test_llave_images_match_the_released_convention(llave):
    """Image and image+text through ``recipe=llave`` equal LLaVE's steps (<= 1e-5; left and right padding,
    batch sizes 1 and 5): the prompt rendered by hand (``preprocess_qwen``: ``<image>\\n{text}`` as the user
    turn; an image alone ``<image>``), LLaVA-OneVision's processor expanding ``<image>`` to its AnyRes count
    and making the pixels, transformers' model, the final "\\n" pooled, L2. Pooling the token before it does
    not match."""
    source, folder = llave
    pairs = [(t, im) for t, im in INPUTS if im is not None] + [(None, _image(120, 40, (250, 250, 0))),
                                                              ("a green square", _image(40, 40, (0, 120, 0)))]
    encoder = llave_encoder(folder)
    ours = {bs: encoder.encode(texts=[t for t, _ in pairs], images=[im for _, im in pairs], batch_size=bs)
            for bs in (1, 5)}
    processor, tok, model = llava_onevision_processor(source), source.tokenizer, source.model.eval()

    def reference(side: str, batch_size: int, offset: int = 0) -> torch.Tensor:
        out = []
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i: i + batch_size]
            prompts = [llave_prompt("<image>\n" + t if t else "<image>") for t, _ in chunk]
            tok.padding_side = side
            enc = processor(text=prompts, images=[im for _, im in chunk], padding=True, return_tensors="pt",
                            add_special_tokens=False)
            with torch.no_grad():
                hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                               pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"],
                               use_cache=False).last_hidden_state
            rows = torch.arange(len(chunk))
            index = enc["attention_mask"].sum(1) - 1 - offset if side == "right" else torch.full((len(chunk),), -1 - offset)
            out.append(torch.nn.functional.normalize(hidden[rows, index], dim=-1))
        return torch.cat(out)

    try:
        for side in ("left", "right"):
            for bs in (1, 5):
                want = reference(side, bs)
                assert_parity(ours[1], want)
                assert_parity(ours[5], want)
        assert (reference("right", 5, offset=1) - ours[5]).abs().max() > 1e-3
    finally:
        tok.padding_side = "right"
