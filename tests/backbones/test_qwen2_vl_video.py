"""Qwen2-VL with several images and a video per item (issue 28): token counts by arithmetic equal the
processed lengths, video pixels against the stock image processor, the host-prepared forward against
transformers' own with images and videos in one chunk, placeholder mismatches refused in one line,
and the trainable vision tower run on a dummy input for a chunk without pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.host_sync import SyncCounter
from embedkit.backbones.base import set_trainable
from embedkit.backbones.qwen2_vl import Qwen2VLBackbone
from embedkit.backbones.qwen2_vl.video_pixels import frame_cap, video_pixels, videos_pixels
from embedkit.data.schema import Item
from embedkit.data.video import Frames
from tests.helpers.images import speckled_image

PIXELS = dict(min_pixels=28 * 28, max_pixels=112 * 112)
#: the keys transformers' own forward takes
MODEL_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
              "pixel_values_videos", "video_grid_thw")


@pytest.fixture(scope="module")
def backbone():
    return Qwen2VLBackbone(seed=0, tiny=True, freeze_vision=False, **PIXELS).train()


def video(n: int, w: int = 84, h: int = 56, seed: int = 0):
    return Frames([speckled_image(w, h, seed + i) for i in range(n)], None, list(range(n)), n)


def images(k: int, seed: int = 0):
    sizes = [(56, 56), (112, 56), (84, 140), (28, 84)]
    return [speckled_image(*sizes[i % len(sizes)], seed + i) for i in range(k)]


def test_num_tokens_is_the_processed_length_for_images_and_videos(backbone):
    """1, 3 and 8 images, videos of 8, 16 and 7 frames (odd: padded to 8), placeholders anywhere; and a
    per-video budget that shrinks the frames (``video_total_pixels``)."""
    items = [
        Item(text="one image", images=images(1)),
        Item(text="<|image_3|> three <|image_1|> images <|image_2|>", images=images(3, 5)),
        Item(text="eight images", images=images(8, 9)),
        Item(text="a video <|video_1|> of eight", video=video(8)),
        Item(text="sixteen frames", video=video(16, 112, 84)),
        Item(text="seven frames <|video_1|>", video=video(7, 56, 84)),
        Item(text="just text"),
        Item(text="frames of two sizes", video=Frames([speckled_image(84, 56, 1), speckled_image(140, 56, 2),
                                                        speckled_image(56, 56, 3)], None, [0, 1, 2], 3)),
    ]
    budget = Qwen2VLBackbone(seed=0, tiny=True, video_total_pixels=4 * 56 * 56, **PIXELS)
    for b in (backbone, budget):
        processor = b.make_processor()
        chunk = processor(items)
        assert chunk["attention_mask"].sum(1).tolist() == [processor.num_tokens(it) for it in items]
        for it in items:  # alone: no padding
            assert processor(([it]))["input_ids"].shape[1] == processor.num_tokens(it)
    grids = backbone.make_processor()(items[3:6])["video_grid_thw"].tolist()
    assert [g[0] for g in grids] == [4, 8, 4]  # temporal patches of 2 frames: 7 frames pad to 8
    small = budget.make_processor()(items[4:5])["video_grid_thw"].tolist()[0]
    assert small[1] * small[2] < grids[1][1] * grids[1][2]  # the budget shrank the 16 frames
    assert frame_cap(16, 784, 112 * 112, 4 * 56 * 56) == 1568  # max(min(max, total / 16 * 2), min * 1.05)
    assert frame_cap(4, 784, 112 * 112, None) == 112 * 112


@pytest.mark.parametrize("n", [8, 7])
def test_video_of_one_repeated_image_is_the_image_processors_output_tiled(backbone, n):
    """The stock ``Qwen2VLImageProcessorPil`` copies an image into both temporal slots: a video whose
    frames are all that image must give exactly those rows, once per temporal patch."""
    from transformers import Qwen2VLImageProcessorPil

    image = speckled_image(98, 70, 3)
    stock = Qwen2VLImageProcessorPil(**PIXELS)(images=[image], return_tensors="np")
    pixels, grid = video_pixels([image] * n, backbone.image_processor, PIXELS["min_pixels"], PIXELS["max_pixels"], None)
    assert grid == [4, *stock["image_grid_thw"][0, 1:].tolist()]
    np.testing.assert_array_equal(pixels, np.tile(stock["pixel_values"], (4, 1)))


def test_video_frames_fill_the_temporal_slots_in_order(backbone):
    """Distinct frames: temporal patch g holds frames 2g and 2g+1 in its two slots (Conv3d's (C, t, p, p)
    layout), the last frame of an odd count repeated."""
    from transformers import Qwen2VLImageProcessorPil

    frames = [speckled_image(56, 56, i) for i in range(5)]
    stock = Qwen2VLImageProcessorPil(**PIXELS)
    pixels, (t, h, w) = video_pixels(frames, backbone.image_processor, PIXELS["min_pixels"], PIXELS["max_pixels"], None)
    assert t == 3
    rows = pixels.reshape(t, h * w, 3, 2, 14, 14)
    for i, frame in enumerate(frames + [frames[-1]]):
        alone = stock(images=[frame], return_tensors="np")["pixel_values"].reshape(h * w, 3, 2, 14, 14)[:, :, 0]
        np.testing.assert_array_equal(rows[i // 2, :, :, i % 2], alone)


def test_videos_of_a_chunk_processed_together_equal_each_alone(backbone):
    """``videos_pixels`` groups videos by frame size and cap into one processor call; each video's rows and grid
    are still its own (sizes interleaved, frame counts differing, a per-video budget that changes the cap)."""
    clips = [[speckled_image(56, 84, 10 * v + i) for i in range(n)] for v, n in enumerate((3, 4, 8, 2))]
    clips[1] = [f.resize((84, 56)) for f in clips[1]]
    for total in (None, 4 * 56 * 56):
        caps = (PIXELS["min_pixels"], PIXELS["max_pixels"], total)
        together = videos_pixels(clips, backbone.image_processor, *caps)
        for clip, (rows, grid) in zip(clips, together):
            alone, alone_grid = video_pixels(clip, backbone.image_processor, *caps)
            assert grid == alone_grid
            np.testing.assert_array_equal(rows, alone)
        assert len({tuple(g) for _, g in together}) >= 3


def _mixed_items():
    return [
        Item(text="only text, longer than the rest of them"),
        Item(text="<|image_2|> three <|image_1|> images <|image_3|>", images=images(3, 1)),
        Item(text="a video <|video_1|> of seven frames", video=video(7, 84, 56, 4)),
        Item(text="x", images=images(1, 7)),
        Item(text="eight frames", video=video(8, 56, 56, 11)),
    ]


def test_host_prepared_forward_equals_transformers_own_with_images_and_videos(backbone):
    """One chunk of a text-only row, three images placed out of order, a 7- and an 8-frame video: the
    host path (one tower pass over image then video patches, features written at the known positions)
    against ``self.model(**inputs)`` with ``pixel_values_videos`` / ``video_grid_thw``: hidden states,
    every layer and every gradient."""
    prepared = backbone.make_processor()(_mixed_items())
    assert "visual_token_index" in prepared and "pixel_values_videos" in prepared
    positions, _ = backbone.model.get_rope_index(
        prepared["input_ids"], prepared["mm_token_type_ids"], image_grid_thw=prepared["image_grid_thw"],
        video_grid_thw=prepared["video_grid_thw"], attention_mask=prepared["attention_mask"])
    assert torch.equal(prepared["rope_position_ids"], positions)
    plain = {k: v for k, v in prepared.items() if k in MODEL_KEYS}
    params = [p for p in backbone.parameters() if p.requires_grad]
    results = []
    for inputs in (prepared, plain):
        with SyncCounter() as c:
            out = backbone(inputs, output_all_layers=True)
            grads = torch.autograd.grad(out.hidden.pow(2).sum(), params, allow_unused=True)
        results.append((out, grads, c))
    (a, ga, ca), (b, gb, cb) = results
    assert all("masking_utils" in site for site in ca.counts), ca.report()  # the host path: no read-back
    assert cb.total() > ca.total(), cb.report()
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=0)
    for x, y in zip(a.all_layers, b.all_layers):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    visual = [g for g, (n, _) in zip(ga, [(n, p) for n, p in backbone.named_parameters() if p.requires_grad])
              if n.startswith("model.visual.")]
    assert visual and all(g is not None and g.abs().sum() > 0 for g in visual)  # the tower saw the pixels
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:  # gradients up to ~50: float rounding of sums taken in another order, relative
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_video_tokens_are_typed_2_and_the_tiny_config_knows_the_video_token(backbone):
    chunk = backbone.make_processor()([Item(text="v", video=video(4)), Item(text="i", images=images(1))])
    vid = backbone.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert vid == backbone.model.config.video_token_id != backbone.tokenizer.unk_token_id
    types = chunk["mm_token_type_ids"]
    assert torch.equal(types == 2, chunk["input_ids"] == vid) and (types[0] == 2).sum() == 2 * 4 * 6 // 4  # 84x56: 2 x 4 x 6 patches
    assert torch.equal(types == 1, chunk["input_ids"] == backbone.model.config.image_token_id)


@pytest.mark.parametrize("item", [
    Item(text="<|image_2|> only one image", images=images(1)),
    Item(text="<|image_1|> and <|image_1|>", images=images(2)),
    Item(text="<|image_1|> a video", video=video(2)),
    Item(text="<|video_1|> <|image_1|>", video=video(2)),
])
def test_placeholder_mismatch_is_a_one_line_refusal(backbone, item):
    reason = backbone.make_processor().refusal(item)
    assert reason and reason.startswith("ValueError: ") and "\n" not in reason
    with pytest.raises(ValueError):
        backbone.make_processor()([item])


def test_a_chunk_without_pixels_runs_a_trainable_tower_on_a_dummy_input(backbone):
    """Text only, tower trainable: the same outputs as without the dummy, the tower's gradients zero
    tensors (DDP sees every parameter used; FSDP2 ranks run the same all-gathers), no host sync added;
    a frozen tower is not run."""
    chunk = backbone.make_processor()([Item(text="a b c"), Item(text="only words here")])
    assert not any(k.startswith("pixel") for k in chunk)
    calls = []
    hook = backbone.model.visual.register_forward_hook(lambda *a: calls.append(1))
    named = [(n, p) for n, p in backbone.named_parameters() if p.requires_grad]
    with SyncCounter() as c:
        out = backbone(chunk, output_all_layers=True)
        grads = torch.autograd.grad(out.hidden.sum() + out.all_layers[1].sum(), [p for _, p in named],
                                    allow_unused=True)
    assert calls == [1]
    assert all("masking_utils" in site for site in c.counts), c.report()
    tower = [g for (n, _), g in zip(named, grads) if n.startswith("model.visual.")]
    assert tower and all(g is not None and not g.any() for g in tower)
    assert any(g is not None and g.any() for (n, _), g in zip(named, grads) if not n.startswith("model.visual."))
    with torch.no_grad():
        plain = backbone(chunk, output_all_layers=True)
    assert calls == [1]  # not run without autograd
    backbone.freeze_vision_tower()  # the module's fixture: trainable again below
    try:
        backbone(chunk)
    finally:
        set_trainable(backbone, backbone.vision_prefixes, True)
        hook.remove()
    assert calls == [1]  # not run for a frozen tower
    assert torch.equal(plain.hidden, out.hidden)
    assert all(torch.equal(x, y) for x, y in zip(plain.all_layers, out.all_layers))


def test_video_pixel_keys_are_checked_in_one_line():
    from embedkit.config.loader import compose
    from embedkit.errors import ConfigError

    Qwen2VLBackbone.check_config({"video_total_pixels": None, "video_max_pixels": 112 * 112})
    with pytest.raises(ValueError, match="video_total_pixels: expected a positive number"):
        Qwen2VLBackbone.check_config({"video_total_pixels": 0})
    with pytest.raises(ConfigError, match="video_min_pixels"):
        compose(["recipe=demo", "model.backbone.video_min_pixels=-4"])
