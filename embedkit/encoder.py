"""Encoder: backbone + pooling head + normalisation, with its processor. A plain ``nn.Module``.

This is the trained model outside the training loop: the LightningModule wraps one (with a loss),
and evaluation, export, encoding and mining use it without Lightning.

    encoder = Encoder.from_config(cfg["model"], seed=cfg["seed"])     # a new model
    encoder = embedkit.load("runs/demo")                                # a trained one (export/reader.py)
    emb = encoder.encode(texts=["a red circle", None], images=[None, img])  # [N, D], no grad
    emb = encoder.encode_items([Item(text="a red circle"), Item(image=img)])  # the same, from Items
    emb = encoder.encode(texts=["<|image_1|> vs <|image_2|>", "a clip"], images=[[a, b], None],
                         videos=[None, "clip.mp4"])              # several images; a video (a path or frames)

A video is decoded with the encoder's frame policy (``encoder.decoding``: the training config's
``data.video``, recorded in an export), so inference sees the frames training saw.

Every encoder carries its ``Provenance`` (where it comes from: the training config, the step, the
Matryoshka sizes it was trained for, its prompts), declared when it is built; ``open_model``
(``embedkit/export/reader.py``) fills it for a checkpoint, a run dir or an export folder.
``embedkit.load(path, layer=l, dim=d)`` (or ``encoder.cut(layer=l, dim=d)``) returns the
model cut to its first ``l`` layers, the layers above dropped, with ``d``-dimensional embeddings (2D
Matryoshka / Starbucks): the same embeddings ``encode(layer=l, dim=d)`` gives, from a smaller model.

``forward(inputs)`` takes one processed chunk (what ``processor()`` makes of a list of ``Item``s,
in the DataLoader workers during training) and returns its embeddings ``[n, D]``, L2-normalised
unless ``model.normalize=false``. An embedding never depends on what else is in the chunk (the
pooling contract: padding invariance).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embedkit.backbones.base import Backbone, ChunkProcessor
from embedkit.data.batch import side_processor
from embedkit.data.schema import Item
from embedkit.errors import UserError
from embedkit.inference import Batching, encode_in_order

#: the prefix of the encoder's weights in a training checkpoint's state_dict
CHECKPOINT_PREFIX = "encoder."


@dataclass(frozen=True)
class Provenance:
    """Where a model comes from, as far as it is known.

    ``kind`` says what was opened: ``checkpoint`` (a file written by ``embedkit fit`` or ``merge``),
    ``run`` (a run dir, through its newest checkpoint), ``export`` (an ``embedkit export`` folder),
    ``sentence_transformers`` (any sentence-transformers folder) or ``config`` (a recipe's model as
    it builds, e.g. ``model.backbone.path`` naming released weights; also a model just built for
    training). ``source`` is the path opened (a run dir, an export folder, ...; for ``config``, the
    backbone's weights); ``checkpoint`` the checkpoint file the weights were read from (kinds
    ``checkpoint`` and ``run``; None otherwise). ``config`` is the resolved training config ({} when unknown),
    ``step`` its optimizer step. ``dims`` / ``pairs``: the Matryoshka dims and 2D (layer, dim)
    pairs the model was trained for (None: any / not Matryoshka-trained). ``prompts``: named
    instruction prompts (``encode(instruction="query")`` looks a name up here).

    Two provenances are equal when they describe the same trained model, whichever way it was
    opened: ``kind``, ``source`` and ``checkpoint`` do not take part in ``==``.
    """

    kind: str = field(default="config", compare=False)
    source: Path | None = field(default=None, compare=False)
    checkpoint: Path | None = field(default=None, compare=False)
    config: dict = field(default_factory=dict)
    step: int = 0
    dims: list[int] | None = None
    pairs: list[tuple[int, int]] | None = None
    prompts: dict[str, str] = field(default_factory=dict)


class Encoder(nn.Module):
    """``backbone`` (a registered adapter), ``pooling`` (a registered head), ``normalize``, and the
    model's ``provenance`` (default: a model built from a config, nothing known about training)."""

    def __init__(self, backbone: Backbone, pooling: nn.Module, normalize: bool = True,
                 provenance: Provenance | None = None):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        if getattr(pooling, "needs_span", False) and getattr(backbone, "vision_ids", None) is None:
            raise UserError(f"model.pooling.span: vision needs a backbone that marks vision blocks (qwen2_vl, "
                            f"qwen2_5_vl, qwen3_vl); {type(backbone).__name__} marks none")
        self.normalize = normalize
        self.provenance = provenance or Provenance()
        self._processor: ChunkProcessor | None = None
        #: the default embedding size of ``forward`` / ``encode`` after ``cut(dim=)`` (None: the head's D)
        self.dim: int | None = None

    @classmethod
    def from_config(cls, model: dict, seed: int = 0, provenance: Provenance | None = None,
                    trained_sizes: Callable[[int, int], tuple] | None = None) -> "Encoder":
        """The ``model`` config section: ``backbone``, ``lora``, ``pooling``, ``normalize``.

        ``trained_sizes(L, D) -> (dims, pairs)``: the Matryoshka sizes the model was trained for, which
        depend on the built model's depth and embedding size (``losses.trained_sizes`` with the
        training config's loss bound); they go into ``provenance``."""
        from embedkit.backbones.lora import apply_lora
        from embedkit.config import registry

        backbone = registry.build("backbone", model["backbone"], seed=seed)
        apply_lora(backbone, model["lora"])
        pooling = registry.build("pooling", model["pooling"], hidden_size=backbone.hidden_size,
                                 num_layers=backbone.num_layers)
        if trained_sizes is not None:
            dims, pairs = trained_sizes(backbone.num_layers, head_dim(backbone, pooling))
            provenance = replace(provenance or Provenance(), dims=dims, pairs=pairs)
        return cls(backbone, pooling, model["normalize"], provenance)

    def load_checkpoint_state(self, state: dict) -> "Encoder":
        """Load the encoder's weights from a training checkpoint's dict (``read_checkpoint``); returns self."""
        own = {k[len(CHECKPOINT_PREFIX):]: v for k, v in state["state_dict"].items() if k.startswith(CHECKPOINT_PREFIX)}
        self.load_state_dict(own, strict=True)
        return self

    @property
    def embedding_dim(self) -> int:
        """D: the size of one embedding vector (a multi-vector head's per-token ``dim``; ``cut(dim=)``'s dim)."""
        return self.dim or head_dim(self.backbone, self.pooling)

    def check_depth(self, layer: int | None = None, dim: int | None = None) -> None:
        """One-line ``UserError`` unless the model can be cut to ``layer`` layers and ``dim`` dimensions:
        1 <= layer <= L with a head that pools one layer; 1 <= dim <= D and, for a Matryoshka-trained
        model, one of its dims. A pair a ``matryoshka_2d`` model did not train for is only warned about."""
        depth = self.backbone.num_layers
        if layer is not None:
            if self.pooling.needs_all_layers:
                raise UserError(f"layer: the {type(self.pooling).__name__} head pools across all layers; a model "
                                "cut to a depth needs a head that pools one layer (last_token, mean, ...)")
            if not 1 <= layer <= depth:
                raise UserError(f"layer: must be between 1 and {depth} (the model's layers), got {layer}")
        if dim is not None:
            if not 1 <= dim <= self.embedding_dim:
                raise UserError(f"dim: must be between 1 and {self.embedding_dim}, got {dim}")
            if self.provenance.dims and dim < self.embedding_dim and dim not in self.provenance.dims:
                raise UserError(f"dim: {dim} is not a dim this model was trained for; its Matryoshka dims: "
                                f"{', '.join(map(str, self.provenance.dims))}")
        pair = (layer or depth, dim or self.embedding_dim)
        if self.provenance.pairs and (layer or dim) and pair not in self.provenance.pairs:
            import warnings

            warnings.warn(f"layer={pair[0]} dim={pair[1]}: not a (layer, dim) pair this model was trained for "
                          f"(loss.pairs {[list(p) for p in self.provenance.pairs]})", stacklevel=3)

    def cut(self, layer: int | None = None, dim: int | None = None) -> "Encoder":
        """Cut the model, in place, to its first ``layer`` layers (the layers above are dropped) and its
        embeddings to the first ``dim`` coordinates (re-normalised); returns self.

        Below the top, the language model's final norm is dropped too: the (layer, dim) sub-model of 2D
        Matryoshka training (``layer_embeddings``) pools layer ``layer``'s output as Hugging Face's hidden
        states hold it, before that norm; so ``cut(layer=l).encode(x)`` == ``encode(x, layer=l)``.
        """
        self.check_depth(layer, dim)
        if layer is not None and layer < self.backbone.num_layers:
            drop_layers(self.backbone, layer)
            skip_final_norm(self.backbone)
        if dim is not None and dim < self.embedding_dim:
            self.dim = dim
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def processor(self) -> ChunkProcessor:
        """The picklable ``Item``s -> model inputs function (made once, shared)."""
        if self._processor is None:
            self._processor = self.backbone.make_processor()
        return self._processor

    def forward(self, inputs: dict, layers: bool = False) -> torch.Tensor:
        """One processed chunk -> embeddings [n, D] (float32); [n, T, d] token sets for a multi-vector head.

        ``layers=True`` (2D Matryoshka training): the pooling head pools the output of every layer
        1..L alike, giving [n, L, D], each normalised; entry L-1 is the full model's embedding.
        """
        if layers:
            return self.layer_embeddings(inputs)
        out = self.backbone(inputs, output_all_layers=self.pooling.needs_all_layers)
        emb = self.pool(out.hidden, out, out.all_layers).float()
        emb = F.normalize(emb, dim=-1) if self.normalize else emb
        return self.truncate(emb, self.dim)

    def pool(self, hidden: torch.Tensor, out, all_layers) -> torch.Tensor:
        """The pooling head on ``hidden`` with the backbone output's mask (and vision span when it asks)."""
        if getattr(self.pooling, "needs_span", False):
            return self.pooling(hidden, out.mask, all_layers, span=out.span)
        return self.pooling(hidden, out.mask, all_layers)

    def layer_embeddings(self, inputs: dict, depth: int | None = None) -> torch.Tensor:
        """[n, L, D]: the pooled, normalised output of layers 1..L (``depth``: the single layer [n, D]).
        Always the head's full D (``cut(dim=)`` does not apply: training reads these)."""
        if self.pooling.needs_all_layers:
            raise UserError(f"model.pooling: {type(self.pooling).__name__} pools across layers; per-layer "
                            "embeddings (matryoshka_2d, layer=) need a head that pools one layer")
        out = self.backbone(inputs, output_all_layers=True)
        per_layer = out.all_layers[-self.backbone.num_layers:]
        # the last entry of Hugging Face's hidden states is the one ``hidden`` reports (final norm applied)
        per_layer = per_layer[:-1] + (out.hidden,)
        if depth is not None:
            per_layer = per_layer[depth - 1 : depth]
        emb = torch.stack([self.pool(h, out, None).float() for h in per_layer], dim=1)
        emb = F.normalize(emb, dim=-1) if self.normalize else emb
        return emb[:, 0] if depth is not None else emb

    @property
    def decoding(self):
        """How this model's inputs are decoded (``data.shards.Decoding``): the frame policy and image cap of
        its training config (``data.video``, ``data.max_image_pixels``); the defaults where it has none."""
        from embedkit.data.shards import Decoding

        return Decoding.from_config(self.provenance.config.get("data") or {})

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str | None] | Sequence[Item] | None = None,
        images: Sequence | None = None,
        instruction: str | None = None,
        batch_size: int = 32,
        dim: int | None = None,
        layer: int | None = None,
        *,
        batch_tokens: int = 0,
        sort: bool = True,
        num_workers: int = 0,
        videos: Sequence | None = None,
        side: str | None = None,
    ) -> torch.Tensor:
        """Texts, images (PIL) and/or videos -> embeddings [N, D] on the CPU, float32, no grad.

        ``texts``, ``images`` and ``videos`` are parallel lists (``None`` entries for a missing part); an
        ``images`` entry is one image or a list of them (in the order of the text's ``<|image_k|>``); a
        ``videos`` entry is a video file's path or bytes, or a list of frames (PIL, in order), sampled by
        the encoder's frame policy (``decoding``; a bad file is one ``UserError`` line naming the entry);
        an image over its ``max_image_pixels`` is resized down as training's reader does (``capped``).
        ``texts`` may instead be a list of ``Item``s. ``instruction`` (a prompt name of ``prompts`` or a literal
        string) is prepended to every text, as sentence-transformers' prompts are. ``dim`` keeps the
        first ``dim`` coordinates (Matryoshka), re-normalised when the encoder normalises. ``layer``
        runs the model to that depth only, 1..L (2D Matryoshka / Starbucks: the pooling head on the
        output of layer ``layer``; L, or None, is the full model). ``batch_tokens``, ``sort``,
        ``num_workers``: how the inference engine batches (``encode_items``). ``side``: ``"query"`` (as None) or
        ``"candidate"``, for a model that frames the sides apart (GME's system messages; ``encode_items``).
        """
        decoding = self.decoding
        items = make_items(texts, images, self.instruction_prefix(instruction), videos, decoding.policy)
        items = [capped(it, decoding.max_image_pixels) for it in items]
        return self.encode_items(items, batch_size, layer=layer, dim=dim, batch_tokens=batch_tokens, sort=sort,
                                 num_workers=num_workers, side=side)

    def instruction_prefix(self, instruction: str | None) -> str | None:
        """The text put before every text for ``instruction``: the model's prompt of that name, else the
        instruction itself; None for none."""
        return self.provenance.prompts.get(instruction, instruction) if instruction else None

    def truncate(self, emb: torch.Tensor, dim: int | None) -> torch.Tensor:
        if dim is None or dim == emb.shape[-1]:
            return emb
        if not 1 <= dim <= emb.shape[-1]:
            raise UserError(f"dim: must be between 1 and {emb.shape[-1]}, got {dim}")
        emb = emb[..., :dim]
        return F.normalize(emb, dim=-1) if self.normalize else emb

    @torch.no_grad()
    def encode_items(self, items: Sequence[Item], batch_size: int = 32, layer: int | None = None,
                     dim: int | None = None, *, batch_tokens: int = 0, sort: bool = True, num_workers: int = 0,
                     progress: Callable[[int, int], None] | None = None, side: str | None = None) -> torch.Tensor:
        """Raw ``Item``s (a list, or ``inference.LazyItems`` made on demand) -> embeddings [N, D] on the
        CPU, in input order, through the inference engine (``embedkit/inference.py``): ordered by exact
        token cost (``sort``), at most ``batch_size`` items and ``batch_tokens`` padded tokens (0: no
        budget) per forward pass, processed in ``num_workers`` loader workers; ``progress(done, total)``
        after each pass. ``layer``, ``dim``: the model cut to that depth and size, as ``encode``. ``side``:
        the processor of that side (``ChunkProcessor.for_side``: ``"candidate"`` frames documents as a released
        embedder does, e.g. GME's default system message; None or ``"query"``: the default)."""
        batching = Batching(batch_size, batch_tokens, sort, num_workers)
        self.check_depth(layer, dim)
        if layer is None or layer == self.backbone.num_layers:
            forward = lambda x: self.truncate(self(x), dim)  # noqa: E731
        else:
            forward = lambda x: self.truncate(self.truncate(self.layer_embeddings(x, depth=layer), self.dim), dim)  # noqa: E731
        if side not in (None, "query", "candidate"):
            raise UserError(f"side: expected query or candidate, got {side!r}")
        processor = side_processor(self.processor(), side) if side else self.processor()
        emb, _ = encode_in_order(items, forward, processor, batching, self.device, progress)
        return emb if emb is not None else torch.empty(0, dim or self.embedding_dim)


def head_dim(backbone: Backbone, pooling: nn.Module) -> int:
    """The pooling head's embedding size (a multi-vector head's per-token ``dim``), else the backbone's hidden size."""
    return getattr(pooling, "output_dim", None) or backbone.hidden_size


def decoder_stack(backbone: Backbone) -> tuple[nn.Module, str]:
    """(module, attribute name) of the language model's list of its L transformer layers: ``layers``
    (Qwen2, Llama, Phi-3, the VLMs' language models) or ``layer`` (BERT's encoder), outside the vision
    tower (whose layer list may be as long)."""
    vision = tuple(backbone.vision_prefixes)
    for name, module in backbone.named_modules():
        if vision and (name + ".").startswith(vision):
            continue
        for attr in ("layers", "layer"):
            stack = getattr(module, attr, None)
            if isinstance(stack, nn.ModuleList) and len(stack) == backbone.num_layers:
                return module, attr
    raise UserError(f"layer: cannot find the {backbone.num_layers} language-model layers of this "
                    f"{type(backbone).__name__} backbone to cut")


def drop_layers(backbone: Backbone, layer: int) -> None:
    """Keep the first ``layer`` layers of the language model, everywhere its depth is recorded: the
    module list, the model config (``num_hidden_layers``, ``layer_types``; what ``save_pretrained``
    writes) and ``backbone.num_layers``."""
    module, attr = decoder_stack(backbone)
    setattr(module, attr, nn.ModuleList(list(getattr(module, attr))[:layer]))
    configs = [getattr(module, "config", None), getattr(backbone, "config", None)]
    for cfg in configs:
        if isinstance(cfg, dict):  # a family that keeps its official config as a dict (Phi-3.5-V)
            if "num_hidden_layers" in cfg:
                cfg["num_hidden_layers"] = layer
        elif cfg is not None:
            cfg.num_hidden_layers = layer
            if getattr(cfg, "layer_types", None):
                cfg.layer_types = list(cfg.layer_types)[:layer]
    backbone.num_layers = layer


def skip_final_norm(backbone: Backbone) -> None:
    """Replace the language model's final norm (``norm``, applied after the last layer) by the identity.
    Models without one (BERT) are left as they are."""
    module, _ = decoder_stack(backbone)
    if isinstance(getattr(module, "norm", None), nn.Module):
        module.norm = nn.Identity()


def make_items(texts, images, prefix: str | None = None, videos=None, policy=None) -> list[Item]:
    """Parallel ``texts`` / ``images`` / ``videos`` lists (or a list of ``Item``s as ``texts``) -> ``Item``s
    (``encode`` says what an entry may be; ``policy``: the ``FramePolicy`` videos are sampled by)."""
    if texts is not None and len(texts) and all(isinstance(t, Item) for t in texts):
        if images is not None or videos is not None:
            raise ValueError("encode: give Items, or texts, images and videos, not both")
        items = list(texts)
    else:
        if isinstance(texts, str):
            texts = [texts]
        n = next((len(x) for x in (texts, images, videos) if x is not None), 0)
        columns = [list(x) if x is not None else [None] * n for x in (texts, images, videos)]
        if len({len(c) for c in columns}) > 1:
            raise ValueError(f"encode: {len(columns[0])} texts, {len(columns[1])} images and {len(columns[2])} "
                             "videos: give one entry each (None for none)")
        items = [_item(i, t, im, v, policy) for i, (t, im, v) in enumerate(zip(*columns))]
    return [prefixed(it, prefix) for it in items] if prefix else items


def _item(i: int, text, images, video, policy) -> Item:
    """Entry ``i`` of ``encode``'s lists as an ``Item``."""
    if images is not None and video is not None:
        raise ValueError(f"encode: entry {i} has images and a video; an item holds one or the other")
    if video is not None:
        return Item(text=text, video=to_frames(video, policy, f"encode: videos[{i}]"))
    if isinstance(images, (list, tuple)):
        return Item(text=text, images=images)
    return Item(text=text, image=images)


def to_frames(video, policy, what: str):
    """A video entry (a file's path or bytes, a list of frames, or ``Frames``) sampled by ``policy``;
    a file that is missing or does not decode is one ``UserError`` line starting with ``what``."""
    from embedkit.data.pixels import BadSample
    from embedkit.data.video import FramePolicy, Frames, frames_from_images, read_video

    policy = policy or FramePolicy()
    if isinstance(video, Frames):
        return video
    try:
        if isinstance(video, (list, tuple)):
            return frames_from_images(video, None, policy)
        if not isinstance(video, (bytes, bytearray)) and not Path(video).is_file():
            raise UserError(f"{what}: video file not found: {video}")
        return read_video(video, policy)
    except BadSample as exc:
        raise UserError(f"{what}: {exc}") from None


def capped(item: Item, max_pixels: int | None) -> Item:
    """``item`` with every image over ``max_pixels`` resized down, aspect kept (``data.pixels.fit``: what
    the training reader does with ``data.max_image_pixels``); the item itself when none is."""
    from embedkit.data.pixels import fit

    images = tuple(fit(im, max_pixels) for im in item.images)
    if all(a is b for a, b in zip(images, item.images)):
        return item
    return Item(text=item.text, images=images)


def prefixed(item: Item, prefix: str | None) -> Item:
    """``item`` with ``prefix`` (an instruction) before its text; a visual-only item gets the prefix as its
    text. No prefix: the item as given."""
    if not prefix:
        return item
    text = prefix + (item.text or "")
    return Item(text=text, video=item.video) if item.video is not None else Item(text=text, images=item.images)


def prefixed_item(text: str | None, image, prefix: str | None) -> Item:
    """``Item(text, image)`` (one image or None) with ``prefix`` before its text, as ``prefixed``."""
    return Item(text=prefix + (text or "") if prefix else text, image=image)

#: the one opt-in that loads a checkpoint with the full unpickler (code in the file may run)
TRUST_OPTION = "trust_checkpoint=true"


def checkpoint_globals() -> list:
    """Every non-tensor type an ``embedkit fit`` / ``merge`` checkpoint holds, for PyTorch's weights-only
    unpickler: numpy's RNG state (``np.random.get_state()``: a uint32 array; the module's RNG record)
    as numpy 2 pickles it and as numpy 1 did. Python's random state, Lightning's loop, optimizer and
    scheduler states and the config are plain dicts, lists, tuples, numbers and strings."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
            (_reconstruct, "numpy.core.multiarray._reconstruct")]


def load_checkpoint_file(path: Path, map_location="cpu", trust: bool = False) -> dict:
    """``torch.load`` of an embedkit checkpoint: weights-only with ``checkpoint_globals`` allowed (no code
    in the file runs), or, with ``trust``, the full unpickler. Anything else: one-line ``UserError``."""
    import pickle

    if trust:
        return torch.load(str(path), map_location=map_location, weights_only=False, mmap=True)
    try:
        with torch.serialization.safe_globals(checkpoint_globals()):
            return torch.load(str(path), map_location=map_location, weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)|got <class '([^']+)'>", str(e))
        what = next(g for g in found.groups() if g) if found else "an object"
        raise UserError(f"ckpt: {path} holds {what}, which no embedkit checkpoint holds; loading it could run "
                        f"code from the file. If you trust the file, add {TRUST_OPTION}") from None


def read_checkpoint(path: str | Path, map_location="cpu", trust: bool = False) -> tuple[dict, dict]:
    """(resolved config, checkpoint dict) of an ``embedkit fit`` checkpoint; plugins loaded first.
    Weights-only unless ``trust`` (``load_checkpoint_file``)."""
    from embedkit.config import registry

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"ckpt: file not found: {path}")
    state = load_checkpoint_file(path, map_location, trust)
    try:
        config = state["hyper_parameters"]["config"]
    except (KeyError, TypeError):
        raise UserError(f"ckpt: {path} is not an embedkit checkpoint (no hyper_parameters.config)") from None
    registry.load_plugins(list(config.get("plugins") or []))
    return config, state
