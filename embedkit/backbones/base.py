"""The backbone adapter contract.

A backbone adapter owns a transformers model and knows how to turn a chunk of ``Item``s into that
model's inputs. The two halves are separate objects because they live in different processes:

- ``Backbone.make_processor()`` returns a picklable ``ChunkProcessor``; the DataLoader workers call
  it on raw chunks ("late processing": VLM processors emit tensors that are not aligned on the batch
  axis, so the model never slices a processed batch).
- ``Backbone.forward(inputs)`` runs the model and returns ``BackboneOutput``: last-layer hidden
  states, the attention mask, and every layer's hidden states when a pooling head asks.

Adapters also declare their LoRA targets as one anchored regex over module names of the language
model only (``lora_target``), and freeze the vision tower unless asked (``freeze_vision=False``).

Every family's constructor has the same shape; only the middle is its own::

    def __init__(self, seed, path=None, tiny=False, dtype="float32", ..., gradient_checkpointing=False):
        super().__init__()
        one_source(FAMILY, path, tiny)        # exactly one of path= / tiny=true, one-line error
        checkpoint = None if tiny else open_checkpoint(path, FAMILY)   # an adapter folder opens its base
        if tiny:
            with seeded(seed):                # the same weights for the same seed, caller's RNG untouched
                self.model = ...              # built in float32
        else:                                 # loaded in ``dtype``, one-line errors (backbones.checkpoints)
            self.model, self.tokenizer, self.image_processor = load_pretrained(
                checkpoint, torch_dtype(dtype), attn_implementation, model_types=(...), image_processor=(...))
        ...                                   # the family's own attributes (sizes, processor settings)
        self.finish_init(tiny=tiny, dtype=dtype, freeze_vision=..., gradient_checkpointing=...)
        if checkpoint is not None:
            checkpoint.merge_adapter(self, peft_module_name)   # a PEFT adapter's names -> this module's

``finish_init`` is the shared tail: the tokenizer's padding, dtype cast of a tiny build, train mode,
vision freezing, projector trainability, non-reentrant gradient checkpointing. The adapter merge comes
after it (it must see the frozen/trainable split, and restores it). A family accepts only the keys it
uses (its constructor's keyword parameters are its config keys): a text model takes no ``freeze_vision``.

Checkpoints are read only through ``backbones.checkpoints``: ``load_pretrained`` for a transformers
layout (a foreign layout through a converter the family passes, as LLaVA-OneVision passes
``llava_qwen.load``), ``Checkpoint.weights`` + ``checkpoints.files.load_mapped`` with the family's key map
for a model built in-project (Phi-3.5-V). Key maps live in the family; the shared code names no family.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from embedkit.data.schema import Item
from embedkit.errors import UserError

IMAGE_PLACEHOLDER = "<|image_1|>"  # MMEB's image placeholder; each backbone swaps in its own token


@dataclass
class BackboneOutput:
    hidden: torch.Tensor  # [B, T, H] last layer
    mask: torch.Tensor  # [B, T] 1 for real tokens
    all_layers: tuple[torch.Tensor, ...] | None = None  # embeddings output + each layer, [B, T, H]
    #: [B, T] bool: the tokens of each row's vision blocks, start and end markers included (jina-v4's image
    #: pooling span, ``pooling.mean(span=vision)``); None where the family marks no vision blocks
    span: torch.Tensor | None = None


class ChunkProcessor:
    """Picklable: ``processor(items) -> dict of tensors`` for one forward pass.

    ``refusal(item)`` is the admission check the training stream runs on every item as its sample is
    drawn, so a sample the processor would refuse is skipped and counted before it takes a place in a
    batch: the default takes every item (a text backbone truncates); a vision-language family refuses what
    its arithmetic (``num_tokens``, no pixels processed) raises on -- an aspect ratio the image processor
    refuses, several image placeholders -- and an item longer than ``max_tokens``."""

    #: the longest processed item (tokens) admitted; None: no limit
    max_tokens: int | None = None

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def num_tokens(self, item: Item) -> int:
        """Sequence length of ``item`` once processed (token-budget chunking). Exact by default, by
        processing it; adapters override it with arithmetic on the image size where they can."""
        return int(self([item])["input_ids"].shape[1])

    def costs(self, items: list[Item]) -> list[int]:
        """``num_tokens`` of each item (cost-aware chunking); adapters may batch the work."""
        return [self.num_tokens(it) for it in items]

    def refusal(self, item: Item) -> str | None:
        """Why this processor would refuse ``item`` (one line), None when it takes it. Default: takes all."""
        return None

    def for_side(self, side: str | None) -> "ChunkProcessor":
        """The processor of one side of a pair, ``"query"`` or ``"candidate"`` (None: the default, the query
        side). A released embedder that frames the two sides apart (GME: the task instruction as the
        query's system message, "You are a helpful assistant." for every candidate) returns a copy set for
        that side; the default frames both alike and returns ``self``. ``data.batch`` asks it per side."""
        return self


def refusal_by_length(processor: ChunkProcessor, item: Item) -> str | None:
    """The vision-language families' ``refusal``: what ``num_tokens`` (arithmetic only) raises on, or a
    processed length over ``max_tokens``."""
    try:
        n = processor.num_tokens(item)
    except (ValueError, ArithmeticError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if processor.max_tokens is not None and n > processor.max_tokens:
        return f"an item of {n} tokens exceeds {processor.max_tokens}"
    if n == 0:
        return "the item tokenized to nothing"
    return None


class Backbone(nn.Module):
    """Base class of backbone adapters; subclasses register with ``@register("backbone", name)``."""

    #: anchored regex over ``named_modules()`` names, language model only
    lora_target: str = ""
    #: module-name prefixes of the vision tower (frozen unless ``freeze_vision=False``)
    vision_prefixes: tuple[str, ...] = ()
    #: module-name prefixes of the vision-to-language projector (trainable only with ``train_projector``)
    projector_prefixes: tuple[str, ...] = ()
    #: whether LoRA leaves the projector trainable (``lora.apply_lora`` reads it)
    train_projector: bool = False
    #: (vision start, vision end) token ids of a family whose outputs carry ``BackboneOutput.span``; else None
    vision_ids: tuple[int, int] | None = None

    hidden_size: int
    num_layers: int

    def make_processor(self) -> ChunkProcessor:
        raise NotImplementedError

    def forward(self, inputs: dict[str, Any], output_all_layers: bool = False) -> BackboneOutput:
        raise NotImplementedError

    def freeze_vision_tower(self) -> None:
        set_trainable(self, self.vision_prefixes, False)

    def finish_init(
        self,
        *,
        tiny: bool,
        dtype: str,
        freeze_vision: bool = False,
        train_projector: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        """The constructor tail every family ends with, once its modules exist.

        - The tokenizer (``self.tokenizer``, when the adapter has one) pads on the right, with EOS as the
          pad token when it has none: chunk processors pad their rows, pooling reads the mask.
        - A tiny build (made in float32) is cast to ``dtype``; a loaded checkpoint is not cast again,
          because its loader already loaded it in ``dtype`` and ``from_pretrained`` deliberately keeps
          computed buffers (RoPE ``inv_freq``) in float32 (docs/bugs-and-fixes.md).
        - Train mode, like a fresh module (``from_pretrained`` returns eval mode; the trainer or the
          evaluator sets the mode).
        - The vision tower frozen when ``freeze_vision``; the projector trainable iff ``train_projector``
          (full fine-tuning; ``lora.apply_lora`` re-applies ``train_projector`` after freezing).
        - Non-reentrant activation checkpointing on every transformers model directly under the adapter
          (``self.model``, or Phi-3.5-V's language model and vision tower).
        """
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "right"
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        if tiny:
            self.to(torch_dtype(dtype))
        self.train()
        if freeze_vision:
            self.freeze_vision_tower()
        self.train_projector = train_projector
        set_trainable(self, self.projector_prefixes, train_projector)
        if gradient_checkpointing:
            from transformers import PreTrainedModel

            models = [m for m in self.children() if isinstance(m, PreTrainedModel)]
            if not models:
                raise TypeError(f"{type(self).__name__}: no transformers model to checkpoint")
            for model in models:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def set_attention(language_model: nn.Module, attention: str, family: str) -> None:
    """``attention=bidirectional``: every token of the language model attends to every real token (NV-Embed,
    arXiv 2405.17428 sec. 3.1; "Pooling and Attention", arXiv 2409.02727), in training and inference alike.

    The switch is transformers' own: ``config.is_causal = False`` on the language model's config. Its forward
    wrapper (``utils.generic``, transformers 5) passes ``is_causal`` to every attention call, and
    ``masking_utils.create_causal_mask`` then builds the padding-only bidirectional mask. The flag is saved in
    the backbone's ``config.json``, so transformers and sentence-transformers read an export the same way.
    A model with no causal attention module (an encoder such as BERT) is refused: it is bidirectional already.
    """
    if attention == "causal":
        return
    if not any(getattr(m, "is_causal", False) is True for m in language_model.modules()):
        raise UserError(f"model.backbone.attention: bidirectional is for decoder models; this {family} model "
                        "has no causal attention (an encoder such as BERT is bidirectional already)")
    language_model.config.is_causal = False


def one_source(family: str, path: str | None, tiny: bool) -> None:
    """A backbone comes from a checkpoint (``path``) or is built tiny and random, never both or neither."""
    if (path is None) == (not tiny):
        raise UserError(f"model.backbone: {family} needs exactly one of path=<dir or hub id> or tiny=true")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (a tiny model's random init) on the CPU generator seeded with ``seed``; the caller's
    CPU RNG stream is restored afterwards and no accelerator generator is touched.

    Only ``torch.default_generator`` is seeded: ``torch.manual_seed`` would also reseed every CUDA
    generator, which ``fork_rng(devices=[])`` does not restore (docs/bugs-and-fixes.md).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def set_trainable(module: nn.Module, prefixes: tuple[str, ...], trainable: bool) -> None:
    """``requires_grad = trainable`` for the parameters whose names start with one of ``prefixes``."""
    for name, param in module.named_parameters():
        if any(name.startswith(p) for p in prefixes):
            param.requires_grad_(trainable)


#: the dtype names a config, ``export dtype=`` and ``load`` accept
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    """``torch.float32`` etc. for a name in ``DTYPE_NAMES``; KeyError otherwise."""
    if name not in DTYPE_NAMES:
        raise KeyError(name)
    return getattr(torch, name)
