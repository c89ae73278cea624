"""Text-only backbone: any transformers ``AutoModel`` encoder or decoder (BERT, Qwen2, Llama, ...).

Loads ``AutoModel`` + ``AutoTokenizer`` from ``path`` (hub id or local directory), or builds a tiny
random ``Qwen2Model`` with the offline word-level tokenizer (``tiny=true``). Items carrying images or a
video are refused in one line (``refusal``, and the processor raises the same ``UserError``). The LoRA target regex is chosen from the module names the model actually
has (decoder-style ``q/k/v/o_proj`` + MLP projections, or BERT-style ``query/key/value`` + dense layers).
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

import torch

from embedkit.backbones import _common
from embedkit.backbones.base import (
    Backbone,
    BackboneOutput,
    ChunkProcessor,
    one_source,
    seeded,
    set_attention,
    torch_dtype,
)
from embedkit.backbones.checkpoints import load_pretrained, open_checkpoint
from embedkit.backbones.checkpoints.files import supported_families
from embedkit.config.registry import register
from embedkit.data.schema import Item
from embedkit.errors import UserError

FAMILY = "hf_text"
#: anchored LoRA targets by module-naming style; the first that matches any module is used
LORA_TARGETS = (
    r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$",  # Llama/Qwen2/Mistral
    r"^model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))$",  # Phi-3
    r"^model\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)$",  # BERT/RoBERTa/XLM-R
)


class TextChunkProcessor(ChunkProcessor):
    def __init__(self, tokenizer, max_length: int, append_eos: bool = True):
        self.tokenizer = tokenizer
        self.max_length = max_length
        eos = tokenizer.eos_token_id
        self.eos = eos if append_eos and eos is not None else None

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = _common.pad_right(self._rows(items), self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _rows(self, items: list[Item]) -> list[list[int]]:
        for item in items:
            why = self.refusal(item)
            if why:
                raise UserError(why)
        cut = self.max_length - (self.eos is not None)
        rows = self.tokenizer([item.text for item in items], truncation=True, max_length=cut)["input_ids"]
        if self.eos is not None:
            rows = [r if r and r[-1] == self.eos else r + [self.eos] for r in rows]
        return rows

    def refusal(self, item: Item) -> str | None:
        """An item with images or a video: this backbone is text-only (one line)."""
        if not item.has_visual:
            return None
        what = "a video" if item.video is not None else "an image" if len(item.images) == 1 else "several images"
        return (f"{FAMILY}: an item has {what}, but backbone {FAMILY!r} is text-only: it embeds text only "
                "(use a vision-language backbone, or data.demo.text_only=true for the demo)")

    def num_tokens(self, item: Item) -> int:
        """The processed length: the tokenizer's row (truncated, EOS added), with no tensors built."""
        return len(self._rows([item])[0])

    def costs(self, items: list[Item]) -> list[int]:
        return [len(r) for r in self._rows(items)]  # one batched tokenizer call


def refuse_multimodal(config, path: str) -> None:
    """A vision-language checkpoint is for its own family, not this text one."""
    if hasattr(config, "vision_config") or hasattr(config, "text_config"):
        raise UserError(
            f"model.backbone.path: {path} holds a multimodal {config.model_type!r} checkpoint; "
            f"{FAMILY} loads text models; supported families: {supported_families()}"
        )


@register("backbone", FAMILY)
class HFText(Backbone):
    """Any transformers AutoModel text encoder or decoder; ``max_length`` truncates (tokens).

    ``append_eos``: end every sequence with the tokenizer's EOS token when it has one and did not add
    it itself (decoders: the state last-token pooling reads; BERT-style tokenizers have none).

    Text only: no ``freeze_vision`` or ``train_projector`` key (there is no vision tower or projector).
    """

    def __init__(
        self,
        seed: int,
        path: Optional[str] = None,
        tiny: bool = False,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str = "sdpa",
        attention: Literal["causal", "bidirectional"] = "causal",
        gradient_checkpointing: bool = False,
        append_eos: bool = True,
        max_length: int = 512,
    ):
        super().__init__()
        from transformers import Qwen2Config, Qwen2Model

        one_source(FAMILY, path, tiny)
        checkpoint = None if tiny else open_checkpoint(path, FAMILY, adapters=False)
        self.max_length = max_length
        self.append_eos = append_eos
        if tiny:
            from embedkit.backbones.processors import tiny_tokenizer

            self.tokenizer = tiny_tokenizer([], pad="<|endoftext|>", eos="<|im_end|>")
            cfg = Qwen2Config(
                vocab_size=len(self.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            )
            cfg._attn_implementation = attn_implementation
            with seeded(seed):
                self.model = Qwen2Model(cfg)
        else:
            self.model, self.tokenizer, _ = load_pretrained(checkpoint, torch_dtype(dtype), attn_implementation,
                                                            check=refuse_multimodal)
        if hasattr(self.model.config, "use_cache"):
            self.model.config.use_cache = False  # an encoder pass keeps no KV cache
        cfg = self.model.config
        self.hidden_size = cfg.hidden_size
        self.num_layers = cfg.num_hidden_layers
        names = [n for n, _ in self.named_modules()]
        self.lora_target = next((t for t in LORA_TARGETS if any(re.fullmatch(t, n) for n in names)), "")
        set_attention(self.model, attention, FAMILY)
        self.finish_init(tiny=tiny, dtype=dtype, gradient_checkpointing=gradient_checkpointing)

    def make_processor(self) -> TextChunkProcessor:
        return TextChunkProcessor(self.tokenizer, self.max_length, self.append_eos)

    def forward(self, inputs: dict[str, Any], output_all_layers: bool = False) -> BackboneOutput:
        out = self.model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            output_hidden_states=output_all_layers, return_dict=True,
        )
        return BackboneOutput(
            out.last_hidden_state, inputs["attention_mask"], tuple(out.hidden_states) if output_all_layers else None
        )

    def save_pretrained(self, directory: str) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
