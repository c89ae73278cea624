"""Helpers shared by the backbone adapters' chunk processing: right padding, Qwen's chat frame, the
refusal of a placeholder in a text-only item, an item's visuals laid out as text pieces, and the dummy vision pass of a chunk without
pixels. (The shared constructor pieces are in ``base``; checkpoint loading is
``backbones.checkpoints``.)

Not a component (the leading underscore keeps the registry from importing it as one).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from embedkit.data.schema import Item, segments

#: MMEB's placeholders (``schema.segments`` reads them; here only to refuse them in a text-only item)
_PLACEHOLDER = re.compile(r"<\|(image|video)_\d+\|>")

#: Qwen's chat markers (ChatML): the Qwen2 tokenizers of LLaVA-OneVision and Qwen2-VL hold both as special tokens
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chat_frame(ids, system: str) -> tuple[list[int], list[int]]:
    """The token ids before and after one user turn in Qwen's chat template, as LLaVE builds them
    (DeepLearnXMU/LLaVE @ 2c23053, llava/train/train.py ``preprocess_qwen``; pieces tokenized apart,
    "\n" its own token)::

        <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n  ...user content...
        <|im_end|>\n<|im_start|>assistant\n\n<|im_end|>\n

    The assistant turn is a lone "\n", so the last token, the state last-token pooling reads, is the
    "\n" after the final ``<|im_end|>``. ``ids(text)`` tokenizes without special tokens."""
    start, end, nl = ids(IM_START), ids(IM_END), ids("\n")
    before = start + ids("system") + nl + ids(system) + end + nl + start + ids("user") + nl
    after = end + nl + start + ids("assistant") + nl + nl + end + nl
    return before, after


#: the system message of Qwen2-VL's chat template when none is given (Qwen2-VL-Instruct chat_template.json);
#: GME uses it for every document (gme_inference.py ``is_query=False``)
DEFAULT_SYSTEM = "You are a helpful assistant."


def chat_text_frame(system: str) -> tuple[str, str]:
    """The text before and after one user turn in Qwen's chat template with the generation prompt, as
    ``apply_chat_template(add_generation_prompt=True)`` renders it and GME builds its inputs
    (GME-Qwen2-VL ``gme_inference.py``, as copied in TIGER-AI-Lab/VLM2Vec @ 6e1e1d4
    ``src/model/baseline_backbone/gme/gme_inference.py``; ms-swift ``GMETemplate``)::

        <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n  ...user content...
        <|im_end|>\n<|im_start|>assistant\n

    The family appends its pooled token after it (GME: ``<|endoftext|>``). The whole string is tokenized
    at once, as the released processors do (unlike ``chat_frame``, LLaVE's pieces tokenized apart)."""
    before = f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n"
    return before, f"{IM_END}\n{IM_START}assistant\n"


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id rows: ``(input_ids [B, T], attention_mask [B, T])``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def check_text_only(text: str, family: str) -> None:
    """A text-only item whose text holds an image or video placeholder: one-line ValueError."""
    found = _PLACEHOLDER.search(text)
    if found:
        raise ValueError(f"{family}: an item's text contains {found.group(0)} but the item has no image or video")


def visual_pieces(item: Item, joiner: str) -> list:
    r"""The item's prompt as pieces: text (str), or ``("image", k)`` / ``("video", 0)``.

    These are ``schema.segments`` with the separators a family puts around its visuals: where the text places
    no visual, the visuals lead it with ``joiner`` between them and "\n" before the text (the single-image
    layout ``<image>\n{text}``); where it places them, the text is taken as it is. Consecutive text pieces
    are joined, so they tokenize as one string."""
    segs = segments(item)
    placed = bool(_PLACEHOLDER.search(item.text or ""))
    out: list = []
    for i, (kind, value) in enumerate(segs):
        if kind == "text":
            out.append(value)
            continue
        out.append((kind, value))
        if not placed and i + 1 < len(segs):
            out.append("\n" if segs[i + 1][0] == "text" else joiner)
    return join_text(out)


def join_text(pieces: list) -> list:
    """Adjacent text pieces joined into one; empty ones dropped."""
    out: list = []
    for piece in pieces:
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        elif piece != "":
            out.append(piece)
    return out


def vision_trainable(module: torch.nn.Module, prefixes: tuple[str, ...]) -> bool:
    """Whether any parameter under ``prefixes`` (the vision tower and projector) takes gradients now."""
    return any(p.requires_grad for name, p in module.named_parameters() if name.startswith(prefixes))


def vision_span(input_ids: torch.Tensor, start_id: int, end_id: int) -> torch.Tensor:
    """[B, T] bool: the tokens from each ``start_id`` to the next ``end_id``, both included (a Qwen-VL row's
    ``<|vision_start|> ... <|vision_end|>`` blocks; several blocks in a row: their union). Tensor ops only,
    no host sync. jina-embeddings-v4 pools an image over this span (``position >= start & position <= end``,
    HF jinaai/jina-embeddings-v4 ``get_single_vector_embeddings``)."""
    starts, ends = (input_ids == start_id).long(), (input_ids == end_id).long()
    # open blocks up to and including each position, minus those closed before it: > 0 inside a block
    return (starts.cumsum(1) - ends.cumsum(1) + ends) > 0


def model_output(backbone: torch.nn.Module, inputs: dict, out, output_all_layers: bool, pixel_keys, dummy,
                 vision_ids: tuple[int, int] | None = None) -> Any:
    """A transformers model output of a chunk as a ``BackboneOutput`` (last hidden state, the chunk's mask, every
    layer when asked; with ``vision_ids`` (start, end token ids) the rows' ``vision_span``); a chunk with none of
    ``pixel_keys`` keeps a trainable tower in the graph (``keep_vision_in_graph`` with ``dummy(device)``)."""
    from embedkit.backbones.base import BackboneOutput

    hidden = out.last_hidden_state
    result = BackboneOutput(hidden, inputs["attention_mask"], out.hidden_states if output_all_layers else None)
    if vision_ids is not None:
        result.span = vision_span(inputs["input_ids"], *vision_ids)
    if any(k in inputs for k in pixel_keys):
        return result
    return keep_vision_in_graph(backbone, result, lambda: dummy(hidden.device))


def keep_vision_in_graph(module: torch.nn.Module, out, dummy) -> Any:
    """``out`` (a ``BackboneOutput``) with ``0 * dummy().sum()`` added to every hidden state, when a chunk
    without pixels meets a trainable vision tower (or projector) under autograd; ``out`` as it is otherwise.

    Data parallelism needs every rank to run the same modules: DDP expects a gradient for every trainable
    parameter (else its reducer waits, or errors on unused parameters), and a rank whose chunk holds no image
    or video would skip the tower while its peers' chunks run it. ``dummy()`` runs the tower (and projector) on
    a minimal input; the added zero puts its parameters in the graph with zero gradients and changes no
    value. It is added after the language model and draws no random numbers, so the RNG stream a GradCache
    replay consumes (LoRA and attention dropout) is the same with and without grad. ``module.vision_prefixes + projector_prefixes`` name the parameters."""
    prefixes = tuple(module.vision_prefixes) + tuple(module.projector_prefixes)
    if not torch.is_grad_enabled() or not vision_trainable(module, prefixes):
        return out
    device = out.hidden.device
    # the dummy draws no random numbers (a dropout in the tower would): the RNG stream of a GradCache replay,
    # which runs it, stays the stream of the no-grad pass, which does not
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        zero = 0 * dummy().sum()
    out.hidden = out.hidden + zero
    if out.all_layers is not None:
        out.all_layers = tuple(h + zero for h in out.all_layers)
    return out


def qwen_token_inputs(tokenizer, texts: list[str], max_length: int, image_token_id: int,
                      video_token_id: int) -> dict[str, torch.Tensor]:
    """The Qwen-VL families' text inputs of a chunk whose visual tokens are already expanded in ``texts``:
    ``input_ids`` and ``attention_mask`` (right-padded, no special tokens added) and transformers 5's
    ``mm_token_type_ids`` (0 text, 1 image, 2 video; Qwen2.5-VL and Qwen3-VL need them). ValueError (one
    line) for a row over ``max_length``."""
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    if enc["input_ids"].shape[1] > max_length:
        raise ValueError(
            f"a sequence of {enc['input_ids'].shape[1]} tokens exceeds max_length={max_length}; "
            "lower model.backbone.max_pixels (or video_max_pixels) or raise model.backbone.max_length"
        )
    ids = enc["input_ids"]
    types = (ids == image_token_id).int() + 2 * (ids == video_token_id).int()
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": types}
