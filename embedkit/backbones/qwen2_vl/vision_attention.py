"""Qwen2-VL / Qwen2.5-VL vision attention with the images of one size in one SDPA call.

transformers' SDPA path of the vision tower splits the packed patches by image and runs one attention
call per image per layer, with a ``.tolist()`` host sync in every layer. ``use_batched_vision_attention``
binds ``batched_vision_attention`` to every vision attention module instead: images of equal patch count
are attended together as one dense batch, one SDPA call per distinct image size per layer, the grouping
(``image_groups``) computed once per forward from ``cu_seqlens`` (or given by the host, see
``host_positions``). Same outputs as the per-image loop (``tests/backbones/test_vision_attention.py``); flash
attention (varlen) and eager keep transformers' own path.
"""

from __future__ import annotations

import sys
import types

import torch

_VISION_ATTENTION = ("VisionAttention", "Qwen2_5_VLVisionAttention")


def use_batched_vision_attention(model) -> int:
    """Give every Qwen2-VL / Qwen2.5-VL vision attention module of ``model`` the batched forward;
    returns how many. The modules share one per-forward cache of the image grouping."""
    cache: dict = {}
    count = 0
    for module in model.modules():
        if type(module).__name__ in _VISION_ATTENTION and type(module).__module__.startswith("transformers.models.qwen2"):
            module._embedkit_groups = cache
            module.forward = types.MethodType(batched_vision_attention, module)
            count += 1
    return count


def image_groups(cu_seqlens: torch.Tensor) -> tuple[list[tuple[int, int, int]], torch.Tensor | None]:
    """Images (the segments of ``cu_seqlens``) grouped by patch count: ``[(length, count, first
    token)]`` over the packed sequence reordered by ``order`` (token indices; None: already grouped,
    i.e. images of one size are adjacent and the groups follow each other)."""
    bounds = cu_seqlens.tolist()  # the one host sync of a forward
    by_len: dict[int, list[int]] = {}
    for i in range(len(bounds) - 1):
        by_len.setdefault(bounds[i + 1] - bounds[i], []).append(i)
    groups, order, start = [], [], 0
    for length, images in by_len.items():
        groups.append((length, len(images), start))
        start += length * len(images)
        order += [t for i in images for t in range(bounds[i], bounds[i + 1])]
    if order == list(range(len(order))):
        return groups, None
    return groups, torch.tensor(order, device=cu_seqlens.device)


def batched_vision_attention(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                             position_embeddings=None, max_seqlen=None, **kwargs) -> torch.Tensor:
    """A Qwen2-VL vision attention forward with one SDPA call per image size (bound to the module)."""
    if self.config._attn_implementation != "sdpa":
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                  max_seqlen=max_seqlen, **kwargs)
    rotate = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    cache = self._embedkit_groups
    if cache.get("key") is not cu_seqlens:  # once per forward (per cu_seqlens: Qwen2.5-VL has two)
        cache.clear()
        cache["key"], cache["groups"] = cu_seqlens, image_groups(cu_seqlens)
    groups, order = cache["groups"]
    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotate(q, k, cos, sin)  # [n, heads, d]
    if order is not None:
        q, k, v = q[order], k[order], v[order]
    dropout = self.attention_dropout if self.training else 0.0
    outs = []
    for length, count, start in groups:
        # [count, heads, length, d]: the images of this size as a dense batch
        qg, kg, vg = (t[start:start + length * count].reshape(count, length, self.num_heads, -1).transpose(1, 2)
                      for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, scale=self.scaling)
        outs.append(o.transpose(1, 2).reshape(count * length, -1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if order is not None:
        out = torch.empty_like(out).index_copy(0, order, out)
    return self.proj(out)
