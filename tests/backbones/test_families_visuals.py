"""Phi-3.5-V and LLaVA-OneVision with several images and a video; the text families refuse visuals; a chunk
without pixels keeps a trainable vision tower in the graph (issue 28).

Tiny random models built from real transformers classes; no downloads.
"""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from embedkit.backbones.hf_text import HFText
from embedkit.backbones.llava_onevision import LlavaOnevision, num_video_tokens
from embedkit.backbones.phi3_v import Phi3V
from embedkit.data.schema import Item
from embedkit.data.video import FramePolicy, frames_from_images
from embedkit.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VLMS = {"phi3_v": Phi3V, "llava_onevision": LlavaOnevision}


def _image(w: int, h: int, seed: int) -> Image.Image:
    """A small image with structure, so different images give different features."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    return [_image(28 + 9 * (i % 4), 28 + 13 * (i % 3), seed + i) for i in range(n)]


def _video(n: int, seed: int = 100):
    return frames_from_images([_image(40, 30, seed + i) for i in range(n)], policy=FramePolicy(num_frames=n))


def _mixed() -> list[Item]:
    """A chunk of every kind: text only, one image, several images placed out of order, a video, several
    images without placeholders."""
    return [
        Item(text="a red circle at the top left"),
        Item(text="<|image_1|> represent the given image", image=_image(56, 40, 1)),
        Item(text="compare <|image_2|> with <|image_1|> and <|image_3|>", images=_images(3, 10)),
        Item(text="<|video_1|> what happens in the video", video=_video(4)),
        Item(text="find a blue square"),
        Item(text="these pictures", images=_images(2, 20)),
    ]


@pytest.fixture(scope="module", params=list(VLMS))
def vlm(request):
    backbone = VLMS[request.param](seed=0, tiny=True)
    backbone.eval()
    return request.param, backbone


def _last(backbone, items) -> torch.Tensor:
    with torch.no_grad():
        out = backbone(backbone.make_processor()(items))
    return out.hidden[torch.arange(len(items)), out.mask.sum(1) - 1]


# -- both families --------------------------------------------------------------------------------------


COUNTED = {
    "1 image": lambda: Item(text="a cat", image=_image(50, 30, 0)),
    "1 image, no text": lambda: Item(image=_image(30, 90, 1)),
    "3 images": lambda: Item(text="<|image_1|> then <|image_2|> then <|image_3|>", images=_images(3)),
    "3 images, led": lambda: Item(text="which differs", images=_images(3, 5)),
    "8 images": lambda: Item(text="slides", images=_images(8, 7)),
    "8 frames": lambda: Item(text="<|video_1|> a clip", video=_video(8)),
    "16 frames": lambda: Item(text="a longer clip", video=_video(16)),
}


@pytest.mark.parametrize("case", list(COUNTED))
def test_num_tokens_by_arithmetic_equals_the_processed_length(vlm, case):
    _, backbone = vlm
    item = COUNTED[case]()
    processor = backbone.make_processor()
    assert processor.num_tokens(item) == processor([item])["input_ids"].shape[1]


def test_a_mixed_chunk_gives_each_item_its_own_embedding(vlm):
    """Text-only, one image, several images, a video in one chunk: each row equals the item alone."""
    _, backbone = vlm
    items = _mixed()
    batch = _last(backbone, items)
    for i, item in enumerate(items):
        torch.testing.assert_close(batch[i], _last(backbone, [item])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[2], batch[5])


def test_placeholders_put_each_image_in_its_place(vlm):
    """``<|image_2|> ... <|image_1|>`` over (a, b) is the prompt ``<|image_1|> ... <|image_2|>`` over (b, a)."""
    _, backbone = vlm
    a, b = _image(40, 40, 1), _image(40, 40, 2)
    swapped = Item(text="first <|image_2|> then <|image_1|>", images=[a, b])
    ordered = Item(text="first <|image_1|> then <|image_2|>", images=[b, a])
    other = Item(text="first <|image_1|> then <|image_2|>", images=[a, b])
    got = _last(backbone, [swapped, ordered, other])
    torch.testing.assert_close(got[0], got[1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got[0], got[2], atol=1e-4)


@pytest.mark.parametrize("text", ["<|image_1|> and <|image_3|>", "<|image_1|> <|image_1|> <|image_2|>",
                                  "<|video_1|> a clip"])
def test_placeholders_that_do_not_match_the_visuals_are_refused_in_one_line(vlm, text):
    _, backbone = vlm
    processor = backbone.make_processor()
    item = Item(text=text, images=_images(2))
    why = processor.refusal(item)
    assert why and "\n" not in why
    with pytest.raises(ValueError):
        processor([item])


def test_a_placeholder_in_a_text_only_item_is_refused(vlm):
    _, backbone = vlm
    processor = backbone.make_processor()
    for text in ("<|image_1|> a cat", "<|video_1|> a clip"):
        assert "no image or video" in processor.refusal(Item(text=text))


# -- Phi-3.5-V: a video is its frames as images ----------------------------------------------------------


def test_phi3v_video_is_its_frames_as_images():
    """A video of n frames reads as n images (each its own HD crops), ``\\n`` between them, in order."""
    backbone = Phi3V(seed=0, tiny=True).eval()
    processor = backbone.make_processor()
    video = _video(8)
    as_video = Item(text="what happens", video=video)
    as_images = Item(text="what happens", images=video.images)
    inputs = processor([as_video])
    assert torch.equal(inputs["input_ids"], processor([as_images])["input_ids"])
    assert inputs["pixel_values"].shape[0] == 8 and len(inputs["image_grids"]) == 8
    got = _last(backbone, [as_video, as_images, Item(text="what happens", images=video.images[::-1])])
    torch.testing.assert_close(got[0], got[1])
    assert not torch.allclose(got[0], got[2], atol=1e-4)


def test_phi3v_image_tokens_per_image_follow_each_crop_grid():
    """Three images of different shapes: each gets ``(h*w + 1) * m^2 + 1 + (h + 1) * m`` tokens for its own
    grid (the official formula), in the order the prompt places them."""
    from embedkit.backbones.phi3_v import hd_grid, num_image_tokens

    backbone = Phi3V(seed=0, tiny=True, num_crops=4)
    processor = backbone.make_processor()
    images = [_image(28, 28, 0), _image(84, 28, 1), _image(28, 60, 2)]
    item = Item(text="<|image_3|> <|image_1|> <|image_2|>", images=images)
    inputs = processor([item])
    grids = [hd_grid(im.width, im.height, 4, backbone.crop) for im in images]
    assert len(set(grids)) == 3
    assert inputs["image_grids"] == [list(grids[2]), list(grids[0]), list(grids[1])]
    counts = [num_image_tokens(h, w, backbone.merged_side) for h, w in grids]
    assert int((inputs["input_ids"] < 0).sum()) == sum(counts)


# -- LLaVA-OneVision: transformers' own forward is the reference -----------------------------------------


def _reference(backbone, inputs) -> torch.Tensor:
    """transformers' own ``LlavaOnevisionModel.forward`` (it raises when token and feature counts differ)."""
    kwargs = {}
    if "pixel_values" in inputs:
        kwargs.update(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                      batch_num_images=inputs["batch_num_images"])
    if "pixel_values_videos" in inputs:
        kwargs["pixel_values_videos"] = inputs["pixel_values_videos"]
    with torch.no_grad():
        return backbone.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              use_cache=False, **kwargs).last_hidden_state


def test_llava_prepared_forward_equals_transformers_forward_on_a_mixed_chunk():
    backbone = LlavaOnevision(seed=0, tiny=True).eval()
    items = _mixed() + [Item(video=_video(4, 300))]  # two videos of 4 frames: transformers stacks them
    inputs = backbone.make_processor()(items)
    assert "video_token_index" in inputs and "image_token_index" in inputs
    with torch.no_grad():
        ours = backbone(inputs).hidden
    torch.testing.assert_close(ours, _reference(backbone, inputs), atol=1e-5, rtol=1e-5)


def test_llava_videos_of_different_lengths_share_a_chunk():
    """8 and 16 frames in one chunk (transformers' forward takes one frame count per call): each row equals
    transformers' forward on that item alone."""
    backbone = LlavaOnevision(seed=0, tiny=True).eval()
    items = [Item(text="short", video=_video(8)), Item(text="long", video=_video(16, 200)), Item(text="text")]
    inputs = backbone.make_processor()(items)
    assert inputs["pixel_values_videos"].shape[:2] == (2, 16) and inputs["video_frames_host"] == [8, 16]
    with torch.no_grad():
        out = backbone(inputs)
    for i, item in enumerate(items):
        alone = backbone.make_processor()([item])
        n = alone["input_ids"].shape[1]
        torch.testing.assert_close(out.hidden[i, :n], _reference(backbone, alone)[0], atol=1e-5, rtol=1e-5)


def test_llava_several_images_take_the_base_view_and_a_newline_each():
    """transformers 5.25 (``replace_image_token``): an item's only image is tiled (AnyRes-Max); each image of a
    several-image item is its base view, side^2 tokens, plus one newline."""
    backbone = LlavaOnevision(seed=0, tiny=True)
    processor = backbone.make_processor()
    side = backbone.model.config.vision_config.image_size // backbone.model.config.vision_config.patch_size
    image_id = backbone.model.config.image_token_id
    several = processor([Item(images=_images(3))])
    assert int((several["input_ids"] == image_id).sum()) == 3 * (side * side + 1)
    one = processor([Item(image=_image(200, 90, 0))])
    assert int((one["input_ids"] == image_id).sum()) > side * side + 1  # tiled


@pytest.mark.parametrize("image_size,patch", [(28, 14), (42, 14), (384, 14)])
def test_llava_video_token_count_is_the_models_feature_count(image_size, patch):
    """``num_video_tokens`` against ``get_video_features`` itself, odd sides included (2x2 pooling rounds up:
    27 x 27 patches of a 384-px frame pool to 14 x 14 = 196)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionModel, Qwen2Config, SiglipVisionConfig

    if image_size == 384:
        assert num_video_tokens(8, tile=384, patch=14) == 8 * 196 + 1
        return
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=image_size, patch_size=patch, vision_use_head=False)
    text = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    model = LlavaOnevisionModel(LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                                     vision_feature_layer=-1, vision_feature_select_strategy="full"))
    with torch.no_grad():
        feats = model.get_video_features(torch.zeros(1, 3, 3, image_size, image_size), return_dict=True).pooler_output
    assert feats.shape[1] == num_video_tokens(3, tile=image_size, patch=patch)


# -- the text families refuse visuals ---------------------------------------------------------------------


@pytest.mark.parametrize("item", [Item(text="a", image=_image(28, 28, 0)), Item(text="b", images=_images(2)),
                                  Item(text="c", video=_video(2))])
def test_hf_text_refuses_images_and_video_in_one_line(item):
    processor = HFText(seed=0, tiny=True).make_processor()
    why = processor.refusal(item)
    assert why and "\n" not in why and "text-only" in why
    with pytest.raises(UserError, match="text-only"):
        processor([Item(text="fine"), item])
    assert processor.refusal(Item(text="fine")) is None


def test_st_encoder_refuses_several_images_and_video_in_one_line():
    from embedkit.export.st_encoder import STEncoder

    encoder = STEncoder.__new__(STEncoder)  # the refusal comes before the model is used
    for item in (Item(text="b", images=_images(2)), Item(text="c", video=_video(2))):
        with pytest.raises(UserError, match="text only; an item has an image or a video"):
            encoder.encode_items([Item(text="fine"), item])


# -- a chunk without pixels keeps a trainable vision tower in the graph ------------------------------------


def _visual_params(backbone) -> dict[str, torch.nn.Parameter]:
    prefixes = backbone.vision_prefixes + backbone.projector_prefixes
    return {n: p for n, p in backbone.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize("family", list(VLMS))
def test_text_chunk_with_a_trainable_tower_gives_zero_tower_grads_and_the_same_outputs(family):
    """DDP/FSDP2: every rank must use the same parameters; a text-only chunk runs the tower on a dummy input
    and adds zero: the outputs are unchanged, and every vision parameter an image chunk uses gets a zero
    gradient (not None). (The tower's layers past the feature layer are unused by images too.)"""
    trainable = VLMS[family](seed=0, tiny=True, freeze_vision=False, train_projector=True)
    frozen = VLMS[family](seed=0, tiny=True)
    processor = trainable.make_processor()
    trainable(processor([Item(text="x", images=_images(2)), Item(video=_video(2))])).hidden.sum().backward()
    used = {n for n, p in _visual_params(trainable).items() if p.grad is not None}
    assert any(n.startswith(trainable.vision_prefixes) for n in used)
    assert any(n.startswith(trainable.projector_prefixes) for n in used)
    trainable.zero_grad(set_to_none=True)
    inputs = processor([Item(text="a red circle"), Item(text="find a blue square at the top")])
    out = trainable(inputs, output_all_layers=True)
    reference = frozen(inputs, output_all_layers=True)
    assert torch.equal(out.hidden, reference.hidden)
    assert all(torch.equal(a, b) for a, b in zip(out.all_layers, reference.all_layers))
    out.hidden.sum().backward()
    for name, param in _visual_params(trainable).items():
        assert (param.grad is not None) == (name in used), name
        assert param.grad is None or not param.grad.any(), name
    frozen(inputs).hidden.sum().backward()  # frozen tower and projector: no dummy pass, no gradients at all
    assert all(p.grad is None for p in _visual_params(frozen).values())


@pytest.mark.parametrize("family", list(VLMS))
def test_no_dummy_pass_without_autograd_or_with_pixels(family, monkeypatch):
    backbone = VLMS[family](seed=0, tiny=True, freeze_vision=False)
    calls = []
    original = backbone._dummy_vision
    monkeypatch.setattr(backbone, "_dummy_vision", lambda: calls.append(1) or original())
    processor = backbone.make_processor()
    with torch.no_grad():
        backbone(processor([Item(text="a cat")]))
    backbone(processor([Item(text="a cat"), Item(text="x", images=_images(2))]))
    assert not calls
    backbone(processor([Item(text="a cat")]))
    assert calls == [1]
