"""LLaVA-OneVision backbone: SigLIP vision tower + projector + Qwen2 language model.

The model is transformers' ``LlavaOnevisionModel`` (no LM head; hidden states out), loaded from a
hub id or a local directory (``path``), or built tiny and random (``tiny=true``: small SigLIP and
Qwen2 configs, the offline word-level tokenizer).

Images follow the OneVision "AnyRes-Max" policy (Li et al., LLaVA-OneVision, arXiv 2408.03326,
sec. 3): the image is fitted to the best grid of tiles from ``image_grid_pinpoints``, each tile and a
resized base view go through the vision tower, the tiled features are unpadded to the image's aspect
ratio, shrunk (bilinear) when they exceed ``anyres_max`` tiles' worth, and a learned newline vector
ends every feature row. The processor computes that token count itself, with the model's own
arithmetic, and expands MMEB's ``<|image_1|>`` into that many image tokens; the model checks the count.
An item with several images gets each at the base resolution plus one newline, and a video goes through
the model's video path (frames encoded one by one, 2 x 2 pooled, one newline per video), both as
transformers' ``LlavaOnevisionProcessor`` counts them (docs/video.md, "Backbones").

Processing is PIL-based (``LlavaOnevisionImageProcessorPil``, and the frames' pixels built here): the stock
processor insists on a torchvision video processor, and torchvision does not import beside the CPU torch.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch

from embedkit.backbones import _common
from embedkit.backbones.base import (
    Backbone,
    BackboneOutput,
    ChunkProcessor,
    one_source,
    refusal_by_length,
    seeded,
    set_attention,
    torch_dtype,
)
from embedkit.backbones.checkpoints import llava_qwen, load_pretrained, open_checkpoint
from embedkit.config.registry import register
from embedkit.data.schema import Item

FAMILY = "llava_onevision"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"


def anyres_pinpoints(tile: int, max_grid: int) -> list[list[int]]:
    """Every grid of 1..max_grid x 1..max_grid tiles; max_grid=6 with 384-px tiles is the reference list."""
    return [[tile * i, tile * j] for i in range(1, max_grid + 1) for j in range(1, max_grid + 1)]


def num_image_tokens(
    height: int, width: int, *, tile: int, patch: int, pinpoints: list[list[int]], anyres_max: int
) -> int:
    """Image tokens for one single-image item, with the arithmetic of ``pack_image_features``."""
    from transformers.image_processing_utils import select_best_resolution

    side = tile // patch
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    cur_h, cur_w = best_h // tile * side, best_w // tile * side
    if width / height > cur_w / cur_h:  # letterboxed top and bottom: unpad rows
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:  # pillarboxed: unpad columns
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    ratio = math.sqrt(cur_h * cur_w / (anyres_max * side**2))
    if ratio > 1.1:
        cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return side * side + cur_h * (cur_w + 1)  # base view + tiled rows, each ended by a newline


def num_video_tokens(frames: int, *, tile: int, patch: int) -> int:
    """Video tokens for ``frames`` frames: each frame's ``side x side`` features pooled (bilinear) to
    ``ceil(side / 2)`` squared, then one newline for the whole video (transformers 5.25,
    ``LlavaOnevisionProcessor.replace_video_token`` and ``LlavaOnevisionModel.get_video_features``)."""
    pooled = math.ceil(tile // patch / 2)
    return frames * pooled * pooled + 1


class LlavaOnevisionChunkProcessor(ChunkProcessor):
    def __init__(self, tokenizer, image_processor, image_token_id: int, tile: int, patch: int,
                 pinpoints: list[list[int]], anyres_max: int, append_eos: bool = True,
                 max_length: int | None = None, system_prompt: str | None = None, video_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.end = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
        self.max_length = max_length
        self.before, self.after = [], []
        if system_prompt is not None:  # prompt=chat: Qwen's chat template around every item
            self.before, self.after = _common.chat_frame(self._ids, system_prompt)
        self.image_processor = image_processor
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.tile, self.patch, self.pinpoints, self.anyres_max = tile, patch, pinpoints, anyres_max

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _row(self, item: Item) -> list[int]:
        """The item's token ids, image and video tokens counted from the image sizes and the frame count
        (nothing is resized here)."""
        if not item.has_visual:
            _common.check_text_only(item.text or "", FAMILY)
            content = self._ids(item.text or "")
            if self.max_length is not None:  # text-only items are cut to max_length tokens in all
                content = content[: max(0, self.max_length - len(self.before) - len(self.after) - len(self.end))]
            return self.before + content + self.after + self.end
        row = list(self.before)
        for piece in _common.visual_pieces(item, ""):  # the chat template's layout: <image><image>\n{text}
            row += self._ids(piece) if isinstance(piece, str) else self._visual_tokens(item, piece[0])
        row += self.after + self.end
        if self.max_length is not None and len(row) > self.max_length:
            raise ValueError(f"{FAMILY}: an item of {len(row)} tokens exceeds max_length={self.max_length}; "
                             "lower model.backbone.max_grid / anyres_max or raise model.backbone.max_length")
        return row

    def _visual_tokens(self, item: Item, kind: str) -> list[int]:
        """One visual's tokens: a video's (``num_video_tokens``); an image's: AnyRes-Max for an item's only
        image, the base view plus one newline for each image of a several-image item (transformers 5.25,
        ``LlavaOnevisionProcessor.replace_image_token``: "only single image patching is supported")."""
        side = self.tile // self.patch
        if kind == "video":
            if self.video_token_id is None:
                raise ValueError(f"{FAMILY}: this checkpoint's config has no video token")
            return [self.video_token_id] * num_video_tokens(len(item.video.images), tile=self.tile, patch=self.patch)
        if len(item.images) > 1:
            return [self.image_token_id] * (side * side + 1)
        image = item.images[0]
        return [self.image_token_id] * num_image_tokens(image.height, image.width, tile=self.tile, patch=self.patch,
                                                        pinpoints=self.pinpoints, anyres_max=self.anyres_max)

    def refusal(self, item: Item) -> str | None:
        """Placeholders that do not match the item's visuals, an item over ``max_tokens``."""
        return refusal_by_length(self, item)

    def num_tokens(self, item: Item) -> int:
        """The processed length by arithmetic: the row ``__call__`` builds, without the pixels."""
        return len(self._row(item))

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        rows = [self._row(item) for item in items]
        if any(len(r) == 0 for r in rows):
            raise ValueError(f"{FAMILY}: an item tokenized to nothing")
        input_ids, attention_mask = _common.pad_right(rows, self.tokenizer.pad_token_id)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        # each item's images in the order the prompt places them: features fill the image tokens in order
        images = [placed_images(item) for item in items if item.images]
        if images:
            out.update(self._image_inputs(images))
            out["image_token_index"] = (input_ids.reshape(-1) == self.image_token_id).nonzero().squeeze(1)
        videos = [item.video.images for item in items if item.video is not None]
        if videos:
            out.update(self._video_inputs(videos))
            out["video_token_index"] = (input_ids.reshape(-1) == self.video_token_id).nonzero().squeeze(1)
        return out

    def _image_inputs(self, images: list[list]) -> dict:
        """The image processor on each item's images (a nested list: it tiles an item's only image and
        pads a several-image item's images to squares, base view only, as transformers does)."""
        pix = self.image_processor(images=images, image_grid_pinpoints=self.pinpoints, return_tensors="pt")
        return {
            "pixel_values": pix["pixel_values"], "image_sizes": pix["image_sizes"],
            "batch_num_images": torch.tensor([len(x) for x in images], dtype=torch.long),
            # as Python lists too, read on the host by the forward (transformers reads each image's size back
            # from the device, several syncs per image)
            "image_sizes_host": pix["image_sizes"].tolist(), "batch_num_images_host": [len(x) for x in images],
        }

    def _video_inputs(self, videos: list[list]) -> dict:
        """Each frame resized to one ``tile x tile`` view (bicubic), rescaled and normalized with the image
        processor's mean and std: what ``LlavaOnevisionVideoProcessor`` does (transformers 5.25: size
        384 x 384, bicubic, CLIP mean/std), built with PIL because that processor needs torchvision.
        ``pixel_values_videos`` is ``[videos, most frames, 3, tile, tile]``, shorter videos zero-padded;
        ``video_frames_host`` holds each video's frame count."""
        import numpy as np
        from PIL import Image

        mean = torch.tensor(self.image_processor.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_processor.image_std, dtype=torch.float32)[:, None, None]
        most = max(len(v) for v in videos)
        pixels = torch.zeros(len(videos), most, 3, self.tile, self.tile)
        for v, frames in enumerate(videos):
            for f, frame in enumerate(frames):
                resized = frame.convert("RGB").resize((self.tile, self.tile), Image.Resampling.BICUBIC)
                t = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
                pixels[v, f] = (t - mean) / std
        return {"pixel_values_videos": pixels, "video_frames_host": [len(v) for v in videos]}


@register("backbone", FAMILY)
class LlavaOnevision(Backbone):
    """LLaVA-OneVision (transformers ``LlavaOnevisionModel``) with right padding and AnyRes-Max tiling.

    ``append_eos``: end every sequence with the EOS token (the state last-token pooling reads).

    ``prompt``: ``none`` (the item's text as it is) or ``chat``: Qwen's chat template with the system
    message ``system_prompt``, the item as the user turn and a lone "\n" as the assistant turn, as LLaVE
    trains (see ``_common.chat_frame``); the pooled state is then the final "\n", so ``append_eos`` must
    be false. ``max_length``: text-only items are cut to this many tokens; a longer image item is an
    error (its image tokens cannot be cut). None: no limit.

    ``path``: a hub id or local folder in the transformers (llava-hf) layout, in LLaVA-NeXT's ``llava_qwen``
    layout (``BAAI/Aquila-VL-2B-llava-qwen``, ``lmms-lab/llava-onevision-qwen2-*-ov``, LLaVE's released
    models; converted by key on load: ``checkpoints/llava_qwen.py``), or a PEFT LoRA/DoRA adapter folder
    over either (merged on load); the layout is detected from ``config.json`` / ``adapter_config.json``.

    ``anyres_max`` caps the tiled features at that many tiles' worth (reference: 9, "anyres_max_9");
    ``max_grid`` builds the tile grids 1..max_grid squared (reference: 6, i.e. up to 2304 px with 384-px
    tiles); None keeps the checkpoint's own values (tiny form: 9 and 6).
    """

    lora_target = (
        r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
    )
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.multi_modal_projector.", "model.image_newline")

    def __init__(
        self,
        seed: int,
        path: Optional[str] = None,
        tiny: bool = False,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str = "sdpa",
        attention: Literal["causal", "bidirectional"] = "causal",
        freeze_vision: bool = True,
        train_projector: bool = False,
        gradient_checkpointing: bool = False,
        append_eos: bool = True,
        anyres_max: Optional[int] = None,
        max_grid: Optional[int] = None,
        max_length: Optional[int] = None,
        prompt: Literal["none", "chat"] = "none",
        system_prompt: str = "You are a helpful assistant.",
    ):
        super().__init__()
        from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionModel

        one_source(FAMILY, path, tiny)
        checkpoint = None if tiny else open_checkpoint(path, FAMILY)
        self.append_eos = append_eos
        self.max_length = max_length
        self.system_prompt = system_prompt if prompt == "chat" else None
        if tiny:
            self.tokenizer = _tiny_tokenizer()
            with seeded(seed):
                self.model = LlavaOnevisionModel(_tiny_config(self.tokenizer))
            tile = self.model.config.vision_config.image_size
            self.image_processor = LlavaOnevisionImageProcessorPil(
                size={"height": tile, "width": tile}, image_grid_pinpoints=anyres_pinpoints(tile, 6)
            )
        else:
            self.model, self.tokenizer, self.image_processor = load_pretrained(
                checkpoint, torch_dtype(dtype), attn_implementation, model_types=(FAMILY,),
                image_processor=(LlavaOnevisionImageProcessorPil, {}),
                converters={llava_qwen.LLAVA_QWEN: llava_qwen.load},
            )
        cfg = self.model.config
        if max_grid is not None:
            cfg.image_grid_pinpoints = anyres_pinpoints(cfg.vision_config.image_size, max_grid)
        if anyres_max is not None:
            cfg.vision_aspect_ratio = f"anyres_max_{anyres_max}"
        self.image_processor.image_grid_pinpoints = cfg.image_grid_pinpoints
        self.hidden_size = cfg.text_config.hidden_size
        self.num_layers = cfg.text_config.num_hidden_layers
        set_attention(self.model.language_model, attention, FAMILY)
        self.finish_init(tiny=tiny, dtype=dtype, freeze_vision=freeze_vision, train_projector=train_projector,
                         gradient_checkpointing=gradient_checkpointing)
        if checkpoint is not None:
            checkpoint.merge_adapter(self, peft_module_name)

    @staticmethod
    def check_config(params: dict) -> None:
        if params.get("anyres_max") is not None and params["anyres_max"] < 1:
            raise ValueError("anyres_max: must be >= 1")
        if params.get("max_grid") is not None and params["max_grid"] < 1:
            raise ValueError("max_grid: must be >= 1")
        if params.get("max_length") is not None and params["max_length"] < 1:
            raise ValueError("max_length: must be >= 1")
        if params.get("prompt") == "chat" and params.get("append_eos"):
            raise ValueError("append_eos: must be false with prompt=chat (the template's final \"\\n\" is pooled)")

    def make_processor(self) -> LlavaOnevisionChunkProcessor:
        cfg = self.model.config
        processor = LlavaOnevisionChunkProcessor(
            self.tokenizer, self.image_processor, cfg.image_token_id,
            tile=cfg.vision_config.image_size, patch=cfg.vision_config.patch_size,
            pinpoints=[list(p) for p in cfg.image_grid_pinpoints],
            anyres_max=int(cfg.vision_aspect_ratio.removeprefix("anyres_max_")), append_eos=self.append_eos,
            max_length=self.max_length, system_prompt=self.system_prompt,
            video_token_id=getattr(cfg, "video_token_id", None),
        )
        # admission (``refusal``): no item longer than the language model's positions
        processor.max_tokens = getattr(cfg.text_config, "max_position_embeddings", None)
        return processor

    def forward(self, inputs: dict[str, Any], output_all_layers: bool = False) -> BackboneOutput:
        if "image_token_index" in inputs or "video_token_index" in inputs:
            return self._forward_prepared(inputs, output_all_layers)
        kwargs = {}
        if "pixel_values" in inputs:
            kwargs = {
                "pixel_values": inputs["pixel_values"].to(self.model.dtype),
                "image_sizes": inputs["image_sizes"],
                "batch_num_images": inputs["batch_num_images"],
            }
        if "pixel_values_videos" in inputs:
            kwargs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.model.dtype)
        out = self.model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
            output_hidden_states=output_all_layers, return_dict=True, **kwargs,
        )
        return self._output(out, inputs, output_all_layers, visual=bool(kwargs))

    def _output(self, out, inputs: dict[str, Any], output_all_layers: bool, visual: bool) -> BackboneOutput:
        result = BackboneOutput(
            out.last_hidden_state, inputs["attention_mask"], tuple(out.hidden_states) if output_all_layers else None
        )
        return result if visual else _common.keep_vision_in_graph(self, result, self._dummy_vision)

    def _dummy_vision(self) -> torch.Tensor:
        """The video path on one blank frame: vision tower, projector, pooling and the newline vector."""
        tile = self.model.config.vision_config.image_size
        pixels = torch.zeros(1, 1, 3, tile, tile, dtype=self.model.dtype, device=self.model.image_newline.device)
        return self.model.get_video_features(pixels, return_dict=True).pooler_output

    def _forward_prepared(self, inputs: dict[str, Any], output_all_layers: bool) -> BackboneOutput:
        """The model's forward for a chunk whose image sizes, frame counts and visual-token positions the
        processor gave on the host: transformers' own ``get_image_features`` / ``get_video_features``, the
        features written at the known positions (``index_copy``: what ``masked_scatter`` does), then the
        language model. The same outputs, without the per-image host syncs."""
        model = self.model
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        flat = embeds.reshape(-1, embeds.shape[-1])
        if "image_token_index" in inputs:
            flat = _place(flat, inputs["image_token_index"], self._image_features(inputs), "image")
        if "video_token_index" in inputs:
            flat = _place(flat, inputs["video_token_index"], self._video_features(inputs), "video")
        out = model(inputs_embeds=flat.view_as(embeds), attention_mask=inputs["attention_mask"], use_cache=False,
                    output_hidden_states=output_all_layers, return_dict=True)
        return self._output(out, inputs, output_all_layers, visual=True)

    def _image_features(self, inputs: dict[str, Any]) -> torch.Tensor:
        sizes = inputs["image_sizes_host"]
        counts = inputs.get("batch_num_images_host", [1] * len(sizes))
        feats = self.model.get_image_features(inputs["pixel_values"].to(self.model.dtype), sizes,
                                              batch_num_images=counts, return_dict=True).pooler_output
        return torch.cat(feats, dim=0)

    def _video_features(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Every video's frames through ``get_video_features`` in one call (its work is per frame), then cut
        per video, each ended by the newline vector as that function ends a video."""
        frames = inputs["video_frames_host"]
        pixels = inputs["pixel_values_videos"]
        every = torch.cat([pixels[v, :n] for v, n in enumerate(frames)])[None].to(self.model.dtype)
        feats = self.model.get_video_features(every, return_dict=True).pooler_output[0]
        per_frame = (feats.shape[0] - 1) // sum(frames)
        newline = feats[-1:]
        pieces = feats[:-1].split([n * per_frame for n in frames])
        return torch.cat([torch.cat([piece, newline]) for piece in pieces])

    def save_pretrained(self, directory: str) -> None:
        """Model, tokenizer and image-processor files: a directory ``path=`` loads back."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


def placed_images(item: Item) -> list:
    """The item's images (RGB) in the order its prompt places them: the features fill the image tokens in
    order, so ``<|image_2|> ... <|image_1|>`` puts the second image first."""
    pieces = _common.visual_pieces(item, "")
    return [item.images[p[1]].convert("RGB") for p in pieces if isinstance(p, tuple) and p[0] == "image"]


def _place(flat: torch.Tensor, index: torch.Tensor, feats: torch.Tensor, kind: str) -> torch.Tensor:
    """``feats`` written at the rows ``index`` of ``flat`` (embeddings ``[B*T, H]``); a count mismatch is the
    one-line error transformers raises (its placeholder mask check)."""
    if feats.shape[0] != index.shape[0]:
        raise ValueError(f"{FAMILY}: {index.shape[0]} {kind} tokens but {feats.shape[0]} {kind} features")
    return flat.index_copy(0, index, feats.to(flat.device, flat.dtype))


def peft_module_name(name: str) -> Optional[str]:
    """A module name of the model a PEFT adapter was saved against (llava_qwen, or transformers'
    LLaVA-OneVision) -> this backbone's (None: no such module)."""
    if name.startswith(("model.vision_tower.vision_tower.", "model.mm_projector.", "model.layers.",
                        "model.embed_tokens", "model.norm", "model.image_newline")):
        mapped = llava_qwen.llava_qwen_key(name + ".weight")
        return None if mapped is None else "model." + mapped[: -len(".weight")]
    if name.startswith("language_model.model."):  # transformers < 4.52 ForConditionalGeneration
        return "model.language_model." + name[len("language_model.model."):]
    return name if name.startswith("model.") else None


def _tiny_tokenizer():
    from embedkit.backbones.processors import tiny_tokenizer

    # the chat markers and "\n" as tokens of their own, as in the Qwen2 tokenizer (prompt=chat)
    return tiny_tokenizer([IMAGE_TOKEN, VIDEO_TOKEN, _common.IM_START, "\n"], pad="<|endoftext|>", eos=_common.IM_END)


def _tiny_config(tokenizer):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=28, patch_size=14, vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlavaOnevisionConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_grid_pinpoints=anyres_pinpoints(vision.image_size, 6),
        vision_aspect_ratio="anyres_max_9", vision_feature_layer=-1, vision_feature_select_strategy="full",
    )
