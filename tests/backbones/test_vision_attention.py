"""Qwen2-VL's batched vision attention (images of one size in one SDPA call) equals transformers'
per-image loop: the vision tower's output, and the whole backbone's, in fp32, images of mixed sizes."""

from __future__ import annotations

import torch

from embedkit.backbones.qwen2_vl import Qwen2VLBackbone, image_groups
from embedkit.data.schema import Item
from tests.helpers.images import speckled_image


def test_groups_gather_images_of_one_size():
    cu = torch.tensor([0, 4, 8, 17, 21, 30])  # sizes 4, 4, 9, 4, 9
    groups, order = image_groups(cu)
    assert groups == [(4, 3, 0), (9, 2, 12)]
    assert order.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 17, 18, 19, 20] + list(range(8, 17)) + list(range(21, 30))
    groups, order = image_groups(torch.tensor([0, 16, 32, 48]))
    assert groups == [(16, 3, 0)] and order is None  # one size: no reordering at all


def test_batched_vision_attention_equals_the_per_image_loop():
    kwargs = dict(seed=0, tiny=True, min_pixels=28 * 28, max_pixels=112 * 112, tiny_vision_layers=3,
                  freeze_vision=False)
    batched = Qwen2VLBackbone(**kwargs).eval()
    loop = Qwen2VLBackbone(batched_vision_attention=False, **kwargs).eval()
    assert all("forward" in vars(m) for m in batched.model.visual.modules() if type(m).__name__ == "VisionAttention")
    assert not any("forward" in vars(m) for m in loop.model.visual.modules())
    sizes = [(56, 56), (112, 56), (56, 56), (84, 112), (56, 112), (112, 56), (56, 56)]
    items = [Item(text="a picture", image=speckled_image(w, h, i)) for i, (w, h) in enumerate(sizes)]
    inputs = batched.make_processor()(items)
    assert len(set(inputs["image_grid_thw"].prod(-1).tolist())) == 3  # three sizes, interleaved
    with torch.no_grad():
        vb = batched.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state
        vl = loop.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).last_hidden_state
        hb, hl = batched(inputs).hidden, loop(inputs).hidden
    assert vb.shape == vl.shape and vb.abs().max() > 0.1
    assert (vb - vl).abs().max() <= 1e-5
    assert (hb - hl).abs().max() <= 1e-5
    # gradients flow through the batched path as through the loop
    x = inputs["pixel_values"].clone()
    gb = torch.autograd.grad(batched.model.visual(x, grid_thw=inputs["image_grid_thw"]).pooler_output.sum(),
                             batched.model.visual.blocks[0].attn.qkv.weight)[0]
    gl = torch.autograd.grad(loop.model.visual(x, grid_thw=inputs["image_grid_thw"]).pooler_output.sum(),
                             loop.model.visual.blocks[0].attn.qkv.weight)[0]
    assert (gb - gl).abs().max() <= 1e-4 * max(1.0, gl.abs().max().item())
