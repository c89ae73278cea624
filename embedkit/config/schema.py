"""The config schema: fixed sections as dataclasses, component blocks checked against the registry.

``validate(raw)`` takes the merged recipe + overrides (plain dicts) and returns a complete plain
dict with every default filled in, or raises ConfigError naming the offending key and what is
accepted. Component blocks (``model.backbone``, ``model.pooling``, ``loss`` ...) are
``{name: <registered name>, **params}``; their params come from the component's constructor.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Collection, Literal, Optional, Union

from embedkit.config import registry
from embedkit.errors import ConfigError


def component(kind: str, default: str):
    """A dataclass field holding a component block of ``kind``."""
    return field(default_factory=lambda: {"name": default}, metadata={"component": kind})


@dataclass
class RunSection:
    name: Optional[str] = None  # default: <recipe>-<timestamp>
    dir: Optional[str] = None  # default: runs/<run.name>
    resume: Literal["never", "auto"] = "never"  # auto: continue run.dir's newest checkpoint when there is one
    init_from: Optional[str] = None  # start from this run dir's, checkpoint's or export's weights (a new stage: fresh optimizer and schedule; docs/stages.md)


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    dora: bool = False
    target: Optional[str] = None  # anchored regex; default: the backbone's language-model projections
    vision: bool = False  # allow targets inside the vision tower (VLM2Vec's suffix-matched targets adapt CLIP)
    init: Literal["default", "gaussian"] = "default"  # PEFT init_lora_weights: True or "gaussian" (VLM2Vec)


@dataclass
class ModelSection:
    backbone: dict = component("backbone", "qwen2_vl")
    pooling: dict = component("pooling", "last_token")
    normalize: bool = True
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class DemoData:
    enabled: bool = False  # train on the drawn demo scenes (demo recipes); else data.train.shards is required
    kind: Literal["scenes", "video", "docs"] = "scenes"  # what is drawn: still scenes, moving clips, document pages (docs/demos.md)
    scenes: Literal["single", "pair", "mixed"] = "single"  # one object, two, or both (scenes and video; docs ignore it)
    train_size: int = 20000
    val_size: int = 120  # held-out queries, each ranked against all val images (clips, pages)
    image_size: int = 56  # a scene's, a clip frame's or a page's side in pixels
    num_frames: int = 4  # video: frames per clip
    first_frame_only: bool = False  # video: every frame replaced by the first (the no-motion baseline)
    holdout_combinations: int = 10  # caption combinations that never occur in training
    seed: int = 1234  # the data's own seed: the drawn scenes do not change with the run seed
    cache_dir: Optional[str] = None  # default: $EMBEDKIT_CACHE or ~/.cache/embedkit
    text_only: bool = False  # captions on both sides (for text-only backbones)


@dataclass
class B3Data:
    """``data.train.batching=b3``: batches from communities of a teacher-ranked preference graph (B3,
    arXiv 2505.11293; defaults and their sources in data/b3.py)."""

    teacher: Optional[str] = None  # the ranking model: a run dir, checkpoint, export or sentence-transformers folder
    window: list = field(default_factory=lambda: [30, 130])  # rank window lo..hi per query (B3's run name "30.130") [unverified]
    cluster_size: int = 32  # examples per cluster (B3's METIS part size, src/arguments.py chunk_size=32)
    resolution: float = 1.0  # Louvain resolution: > 1 gives smaller communities
    batch_size: int = 32  # the teacher's items per forward pass while ranking
    cache_dir: Optional[str] = None  # partitions cached by teacher + data + settings + seed; default: $EMBEDKIT_CACHE or ~/.cache/embedkit


@dataclass
class TrainData:
    shards: Optional[str] = None  # a folder of .tar shards or a brace pattern; None: the demo data
    num_negatives: int = 0  # hard negatives per example (K); padded or cut to exactly K
    num_workers: int = 1  # DataLoader workers; processing runs there
    shuffle_buffer: int = 1000
    mix: dict = field(default_factory=dict)  # subset -> weight; unlisted: its example count (manifest) or shard count; 0 drops it
    task_batch_size: int = 0  # examples per device drawn from one subset in a row (capped at the device's batch), same subset on every rank; 0: fully mixed
    epoch_steps: int = 0  # batches per rank per epoch (resampled shards); 0: endless, trainer.max_steps ends the run
    group_by: Literal["none", "modality"] = "none"  # modality: every optimizer step's queries all image or all text (drawn per step by the weights of each modality's subsets)
    length_order: Literal["none", "sorted", "balanced"] = "none"  # re-deal a worker's micro-batches of one optimizer step by words: sorted = length-homogeneous, balanced = equal word totals
    batching: Literal["random", "b3"] = "random"  # random = the mixture plan; b3 = batches from teacher-ranked communities (data.train.b3)
    b3: B3Data = field(default_factory=B3Data)


@dataclass
class ValData:
    shards: Optional[str] = None  # None: the demo's held-out split
    max_queries: int = 1000
    enabled: bool = True


@dataclass
class MuveraSettings:
    """MUVERA's fixed-dimensional encodings (arXiv 2405.19588; docs/muvera.md) for data.eval.retrieval=muvera."""

    k_sim: int = 4  # SimHash hyperplanes per repetition: 2^k_sim buckets
    d_proj: Optional[int] = 16  # each token projected to this many numbers per bucket; None: no projection
    repetitions: int = 16  # independent partitions concatenated (FDE size: repetitions * 2^k_sim * d_proj)
    candidates: int = 100  # per query, this many of its candidates (best by FDE) re-ranked by exact MaxSim


@dataclass
class EvalData:
    root: Optional[str] = None
    datasets: list[str] = field(default_factory=list)
    # corpus task folders (task.json, queries/corpus/qrels.jsonl: docs/eval-tasks.md): visual documents
    # by NDCG@5, text<->video R@k, classification, moments; scored with or without data.eval.root
    tasks: list[str] = field(default_factory=list)
    val_rows: int = 0  # >0: during fit, each validation also scores this many rows per dataset (val/<dataset>/p@1)
    # how embedkit eval ranks token-vector sets (model.pooling=multi_vector): exact MaxSim over every
    # candidate, or MUVERA's FDE picks data.eval.muvera.candidates per query and exact MaxSim re-ranks them
    retrieval: Literal["exact", "muvera"] = "exact"
    muvera: MuveraSettings = field(default_factory=MuveraSettings)
    mmeb_v2_root: Optional[str] = None  # `embedkit eval benchmark=mmeb_v2`: the MMEB-V2 eval layout (docs/mmeb-v2.md "Running it")


@dataclass
class VideoData:
    """The frame policy (``data.video.FramePolicy``, docs/video.md) of every reader: training, validation,
    ``embedkit encode``, ``embedkit mine`` and the exported model."""

    num_frames: int = 8  # the most frames kept (VLM2Vec-V2's 8 uniformly sampled frames)
    sampling: Literal["uniform", "fps"] = "uniform"  # uniform: by index; fps: by presentation time
    fps: Optional[float] = None  # frames per second of video, sampling=fps only
    min_frames: int = 1  # fewer decodable frames: the sample is skipped as video_short
    max_pixels: Optional[int] = None  # a larger frame is resized down, aspect kept; None: native size


@dataclass
class DataSection:
    train: TrainData = field(default_factory=TrainData)
    val: ValData = field(default_factory=ValData)
    eval: EvalData = field(default_factory=EvalData)
    demo: DemoData = field(default_factory=DemoData)
    video: VideoData = field(default_factory=VideoData)
    # an image (or page) with more pixels is resized down, aspect kept, and counted as a resize (not a
    # skip); None: native size (the backbone's processor still resizes to its own budget)
    max_image_pixels: Optional[int] = None


@dataclass
class TrainSection:
    global_batch_size: int = 64  # the contrastive batch across all ranks
    chunk_size: int = 64  # items encoded per forward pass, per device (GradCache sub-batch)
    # also cap each forward pass at this many padded tokens (items x longest sequence), so chunks
    # of high-resolution images cost alike; 0: off. Under trainer.strategy=fsdp2 the ranks pad to
    # the same number of forward passes (docs/gradcache.md)
    chunk_tokens: int = 0
    # order each side's items by cost (text + image tokens) before cutting chunks (token budget:
    # first-fit decreasing) and restore the order before the loss: less padding, same gradients
    sort_chunks: bool = True
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.0  # sgd only
    warmup: float = 0.03  # fraction of max_steps spent warming up linearly
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    clip_grad_norm: Optional[float] = 1.0
    accumulate_steps: int = 1
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after the linear warm-up: decay to lr * min_lr_ratio, or flat
    max_skipped_steps: int = 10  # consecutive non-finite steps (skipped, no update) before the run stops
    # drop in-batch false negatives: candidates with the same content (text and pixels) as a query's
    # positive leave its softmax, across ranks and chunks (logged as train/masked_negatives)
    mask_duplicates: bool = False
    # also drop negatives scoring above (positive score - margin); UniME: -0.1. None: off
    false_negative_margin: Optional[float] = None
    # torch.compile the encoder's forward of each chunk (for GPUs: fewer kernel launches; the first
    # steps of each new chunk shape compile; on a CPU it only costs compile time). false: eager
    compile: bool = False


@dataclass
class TrainerSection:
    max_steps: int = 1000
    # >0: train this many passes over the training examples instead; optimizer steps =
    # epochs * examples // (global_batch_size * accumulate_steps), examples from the shards' manifest.json
    max_epochs: int = 0
    devices: Union[int, str] = 1
    num_nodes: int = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    precision: str = "32-true"
    tf32: bool = False  # TensorFloat-32 for float32 matmuls and convolutions on Ampere+ GPUs (speed only)
    val_check_interval: Optional[int] = None  # optimizer steps between validations; None: at the end
    log_every_n_steps: int = 10
    progress: Literal["auto", "bar", "log", "none"] = "auto"
    checkpoint_every: Optional[int] = 500  # optimizer steps between checkpoints (plus one at the end); None: end only
    keep_checkpoints: int = 3  # newest step-N.ckpt files kept (last.ckpt always points at the newest)
    stop_signal: Optional[str] = None  # e.g. SIGUSR1 (SLURM --signal): stops cleanly like SIGTERM/SIGINT
    # seconds a rank waits in a collective for the others before the run stops with a line naming the
    # lost rank (DDP and FSDP2; gloo's and NCCL's timeout alike); must outlast the longest legitimate
    # wait, rank 0 writing a checkpoint (docs/clusters.md)
    collective_timeout_s: int = 900


@dataclass
class TrackingSection:
    enabled: bool = True
    uri: Optional[str] = None  # default: sqlite:///runs/mlflow.db of the working directory
    experiment: str = "embedkit"
    tags: dict = field(default_factory=dict)


@dataclass
class PaperSection:
    """What a recipe reproduces; shown by ``embedkit recipes``, never read by training."""

    mmeb: Optional[float] = None  # the paper's MMEB overall score for this recipe's model
    source: Optional[str] = None  # where that score is printed (paper + table)


@dataclass
class Config:
    seed: int = 0
    recipe: Optional[str] = None  # set by the loader
    plugins: list[str] = field(default_factory=list)
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: dict = component("loss", "infonce")
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    paper: PaperSection = field(default_factory=PaperSection)


#: numeric keys with a lower bound (a batch of 0 would fail deep inside torch, far from its cause)
MINIMUMS = {
    "train.global_batch_size": 1, "train.chunk_size": 1, "train.chunk_tokens": 0, "train.accumulate_steps": 1,
    "train.lr": 0.0, "train.weight_decay": 0.0, "train.warmup": 0.0, "train.min_lr_ratio": 0.0,
    "trainer.max_steps": 1, "trainer.max_epochs": 0, "trainer.num_nodes": 1, "trainer.log_every_n_steps": 1, "trainer.val_check_interval": 1,
    "trainer.checkpoint_every": 1, "trainer.keep_checkpoints": 1, "train.max_skipped_steps": 1,
    "trainer.collective_timeout_s": 1,
    "data.train.num_negatives": 0, "data.train.num_workers": 0, "data.train.shuffle_buffer": 1,
    "data.train.task_batch_size": 0, "data.train.epoch_steps": 0,
    "data.video.num_frames": 1, "data.video.min_frames": 1, "data.video.max_pixels": 1, "data.max_image_pixels": 1,
    "data.demo.train_size": 1, "data.demo.val_size": 1, "data.demo.image_size": 28, "data.demo.holdout_combinations": 0,
    "model.lora.r": 1,
    "data.eval.muvera.k_sim": 0, "data.eval.muvera.d_proj": 1, "data.eval.muvera.repetitions": 1,
    "data.eval.muvera.candidates": 1,
}


def validate(raw: dict, overridden: Collection[str] = ()) -> dict:
    """Fill defaults and check keys, types and component names; ConfigError on the first problem.
    ``overridden``: the dotted keys the command line set (``config.loader.compose``), for the rules on
    overrides that cannot take effect."""
    registry.load_plugins(list(raw.get("plugins") or []))
    cfg = _section(Config, raw, "")
    check_combinations(cfg, overridden)
    return cfg


#: (key set on the command line, the key whose value decides whether it takes effect, the values of
#: that key under which it does not, the fix): an override that cannot take effect is refused rather
#: than ignored (``trainer.max_steps=3`` on a recipe with ``trainer.max_epochs: 1`` would train a full epoch)
INEFFECTIVE_OVERRIDES = (
    ("trainer.max_steps", "trainer.max_epochs", lambda v: v > 0, "trainer.max_epochs=0 to train by steps"),
    ("model.lora.", "model.lora.enabled", lambda v: not v, "model.lora.enabled=true"),
    ("train.momentum", "train.optimizer", lambda v: v != "sgd", "train.optimizer=sgd (adamw has no momentum)"),
    ("train.betas", "train.optimizer", lambda v: v != "adamw", "train.optimizer=adamw"),
    ("train.min_lr_ratio", "train.schedule", lambda v: v == "constant", "train.schedule=cosine or linear"),
    ("data.eval.muvera.", "data.eval.retrieval", lambda v: v != "muvera", "data.eval.retrieval=muvera"),
    ("data.train.b3.", "data.train.batching", lambda v: v != "b3", "data.train.batching=b3"),
)


def check_combinations(cfg: dict, overridden: Collection[str] = ()) -> None:
    """Rules that involve more than one key, all here: ConfigError naming the keys. ``overridden``:
    the keys set on the command line; one that cannot take effect (``INEFFECTIVE_OVERRIDES``) is an error."""
    for key, decider, ignored_when, fix in INEFFECTIVE_OVERRIDES:
        value = _value_at(cfg, decider)
        hits = [k for k in overridden if (k.startswith(key) if key.endswith(".") else k == key) and k != decider]
        if hits and ignored_when(value):
            hit = sorted(hits)[0]
            raise ConfigError(f"{hit}={_shown(_value_at(cfg, hit))}: cannot take effect while {decider}="
                              f"{_shown(value)}; set {fix}")
    trainer, train = cfg["trainer"], cfg["train"]
    if trainer["strategy"] == "fsdp2":
        if not isinstance(trainer["devices"], int):
            raise ConfigError(f"trainer.strategy=fsdp2 needs an integer trainer.devices, got {trainer['devices']!r}")
    devices = trainer["devices"]
    if isinstance(devices, int) and devices > 0:
        world = devices * trainer["num_nodes"]
        if train["global_batch_size"] % world:
            raise ConfigError(f"train.global_batch_size={train['global_batch_size']} is not divisible by the "
                              f"{world} devices (trainer.devices x trainer.num_nodes)")
    _check_video(cfg["data"]["video"])
    _check_b3(cfg["data"]["train"])


def _check_b3(train: dict) -> None:
    """batching=b3's settings in range (its teacher is checked by ``fit``, as data.train.shards is:
    a recipe names no teacher, the command line does)."""
    if train["batching"] != "b3":
        return
    b3 = train["b3"]
    for key in ("cluster_size", "batch_size"):
        if b3[key] < 1:
            raise ConfigError(f"data.train.b3.{key}: {b3[key]!r} is below its minimum, 1")
    if not b3["resolution"] > 0:
        raise ConfigError(f"data.train.b3.resolution: {b3['resolution']!r} must be > 0")
    w = b3["window"]
    if len(w) != 2 or not all(isinstance(x, int) for x in w) or not 1 <= w[0] <= w[1]:
        raise ConfigError(f"data.train.b3.window={w!r}: expected [lo, hi] with 1 <= lo <= hi (ranks, 1-based)")


def _check_video(video: dict) -> None:
    """data.video.fps goes with sampling=fps, and only with it (the rule ``FramePolicy`` checks too)."""
    if video["sampling"] == "fps" and (video["fps"] is None or not video["fps"] > 0):
        raise ConfigError(f"data.video.sampling=fps needs a positive data.video.fps, got {video['fps']!r}")
    if video["sampling"] == "uniform" and video["fps"] is not None:
        raise ConfigError("data.video.fps: only for data.video.sampling=fps (sampling is uniform)")


def _value_at(cfg: dict, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _shown(value: Any) -> str:
    """A config value as it is written on the command line (``true``, ``1``, ``adamw``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _section(cls, raw: Any, prefix: str) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, fields, prefix)
    out = {}
    for name, f in fields.items():
        key = prefix + name
        if "component" in f.metadata:
            out[name] = _component(f.metadata["component"], raw.get(name), f.default_factory()["name"], key)
        elif dataclasses.is_dataclass(hints[name]):
            out[name] = _section(hints[name], raw.get(name), key + ".")
        elif name in raw:
            out[name] = coerce(raw[name], hints[name], key)
            low = MINIMUMS.get(key)
            if low is not None and out[name] is not None and out[name] < low:
                raise ConfigError(f"{key}: {out[name]!r} is below its minimum, {low}")
        else:
            out[name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return out


def _component(kind: str, raw: Any, default: str, key: str) -> dict:
    if raw is None:
        raw = {"name": default}
    elif isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a {kind} name or a mapping with 'name', got {raw!r}")
    name = raw.get("name", default)
    if not isinstance(name, str):
        raise ConfigError(f"{key}.name: expected a {kind} name, got {name!r}")
    comp = registry.get(kind, name, key=f"{key}.name")
    _reject_unknown(raw, {"name": None, **comp.params}, key + ".", what=f"{kind} {name!r}")
    out = {"name": name}
    for pname, param in comp.params.items():
        pkey = f"{key}.{pname}"
        if pname in comp.nested:
            out[pname] = _component(comp.nested[pname], raw.get(pname), param.default, pkey)
        elif pname in raw:
            out[pname] = coerce(raw[pname], param.annotation, pkey)
        else:
            out[pname] = param.default
    check = getattr(comp.factory, "check_config", None)
    if check is not None:
        # a component rejects bad values by raising ValueError("<param>: <why>")
        try:
            check(out)
        except ValueError as exc:
            raise ConfigError(f"{key}.{exc}") from None
    return out


#: Lightning Trainer options that clash with the module's manual optimization (GradCache): the
#: module accumulates, clips and steps itself, so these would be silently ignored or double-applied
MANUAL_OPTIMIZATION_CLASHES = {
    "trainer.accumulate_grad_batches": "train.accumulate_steps",
    "trainer.gradient_clip_val": "train.clip_grad_norm",
    "trainer.gradient_clip_algorithm": "train.clip_grad_norm (always the global L2 norm)",
    "trainer.automatic_optimization": "nothing: the module always optimizes manually (GradCache)",
}


def _reject_unknown(raw: dict, accepted, prefix: str, what: str | None = None) -> None:
    for k in raw:
        if prefix + k in MANUAL_OPTIMIZATION_CLASHES:
            raise ConfigError(f"{prefix}{k}: refused, the module optimizes manually (GradCache); "
                              f"use {MANUAL_OPTIMIZATION_CLASHES[prefix + k]} instead")
        if k not in accepted:
            owner = f" of {what}" if what else ""
            raise ConfigError(
                f"{prefix}{k}: unknown key{owner}; accepted: {', '.join(sorted(accepted))}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return _REFUSED


def _to_int(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(value) if isinstance(value, str) else _REFUSED
    except ValueError:
        return _REFUSED


def _to_float(value: Any) -> Any:
    if _is_number(value):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else _REFUSED
    except ValueError:
        return _REFUSED


def _to_str(value: Any) -> Any:
    if isinstance(value, str):
        return value
    return str(value) if _is_number(value) else _REFUSED


_REFUSED = object()
#: scalar type -> converter returning the value as that type, or _REFUSED
_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member type of ``tp`` that takes ``value`` (None for an Optional)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in (a for a in args if a is not type(None)):
        try:
            return coerce(value, arg, key)
        except ConfigError:
            pass
    raise _type_error(key, value, tp)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (numeric strings such as '3e-3' become numbers), else ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not accepted; choices: {', '.join(map(str, typing.get_args(tp)))}")
    if tp in _SCALARS:
        out = _SCALARS[tp](value)
        if out is _REFUSED:
            raise _type_error(key, value, tp)
        return out
    if (origin or tp) in (list, dict):
        return _coerce_container(value, tp, key)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(key, value, tp)


def _coerce_container(value: Any, tp: Any, key: str) -> Any:
    """A list (a tuple becomes one; items coerced to ``list[T]``'s T) or a dict (copied), else ConfigError."""
    args = typing.get_args(tp)
    if (typing.get_origin(tp) or tp) is dict:
        if not isinstance(value, dict):
            raise _type_error(key, value, tp)
        return dict(value)
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise _type_error(key, value, tp)
    return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return ConfigError(f"{key}: expected {name}, got {value!r}")
