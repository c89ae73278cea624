"""``embedkit mine``: hard negatives for every example of a set of shards, mined with a trained model.

    embedkit mine model=RUN_DIR|EXPORT|CKPT shards=SRC out=DST num_negatives=K
                  [window=[30,100]] [threshold=0.95] [judge=embedding] [judge.PARAM=VALUE ...]
                  [pick=top|random] [seed=0] [batch_size=32] [num_workers=0] [device=cpu|cuda]
                  [dtype=float32|bfloat16|float16] [plugins=[mod,...]]

Each source folder of SRC (an MMEB subset) is encoded, its queries retrieve their top targets, the
rank window is kept, duplicates of the positive and the judge's false negatives (score above
``threshold`` x the positive's) are dropped, and DST gets the same shards with K mined negatives and
their scores per example, plus DST/manifest.json (provenance). Under ``torchrun --nproc_per_node N -m
embedkit mine ...`` each subset is encoded once, split across the N processes, and its shards are
written by the processes in turn; the bytes are those of one process. Re-run after an interruption, it
resumes; with the same inputs, the bytes are the same. Train on it with
``embedkit fit data.train.shards=DST data.train.num_negatives=K``. See ``embedkit/mining/miner.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from embedkit.commands._options import Verb, option
from embedkit.errors import UserError


@dataclass
class MineOptions:
    model: str = option(help="the model that mines: a run dir, an export folder or a checkpoint", metavar="PATH")
    shards: str = option(help="the shard set to mine for (a folder of subset folders of .tar shards)",
                         metavar="SRC")
    out: str = option(help="the folder for the mined shards and their manifest", metavar="DST")
    num_negatives: int = option(help="mined negatives per example", minimum=1, metavar="K")
    window: list[int] = option([30, 100], "the ranks the negatives come from: [first rank, last rank], 1-based",
                               minimum=1, metavar="[FIRST,LAST]")
    threshold: float = option(0.95, "drop a candidate the judge scores above threshold x the positive's score (for a negative "
                                      "score: that margin below it)")
    judge: str = option("embedding", "the judge of false negatives (a registered judge name)", metavar="NAME")
    judge_params: dict[str, str] = option({}, "one of the judge's parameters (repeatable)", prefix="judge",
                                          metavar="VALUE")
    pick: Literal["top", "random"] = option("top", "which negatives of the window are kept")
    seed: int = option(0, "the seed of pick=random", minimum=0)
    batch_size: int = option(32, "items per forward pass", minimum=1)
    device: Optional[str] = option(None, "cpu, cuda, cuda:1 ...; null: the CPU", metavar="DEVICE")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = option(None, "run the model in this dtype; "
                                                                        "null: as stored")
    num_workers: int = option(0, "loader processes that decode and process images ahead of the model; "
                                 "0: in this process", minimum=0)
    plugins: list[str] = option([], "modules to import first (they register judges)", metavar="[MODULE,...]")
    trust_checkpoint: bool = option(False, "read a checkpoint you trust with the full unpickler (it may run code "
                                           "from the file); default: weights and embedkit's own states only")

    def judge_block(self) -> dict:
        """The judge as a component block: its name and parameters."""
        return {"name": self.judge, **self.judge_params}

    def __post_init__(self):
        if len(self.window) != 2 or self.window[0] > self.window[1]:
            raise UserError(f"window: expected [first rank, last rank] with first <= last, e.g. [30,100], "
                            f"got {self.window}")


VERB = Verb("mine", "hard negatives with false-negative filtering", MineOptions)


def sources(spec: str, out: str) -> tuple[dict[str, list[tuple[str, str]]], Path]:
    """{subset: [(shard, path relative to the source root)]} of ``spec``, and the root."""
    from embedkit.data.shard_set import ShardSet
    from embedkit.data.shards import list_shards

    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"shards: {spec} is not a folder of .tar shards")
    shards = [s for s in list_shards(root) if ".mine" not in Path(s).relative_to(root).parts]
    if not shards:
        raise UserError(f"shards: no .tar shards found at {spec}")
    if Path(out).expanduser().resolve() == root.resolve():
        raise UserError("out: must differ from shards= (mined shards are new files)")
    return ({name: [(s, str(Path(s).relative_to(root))) for s in group]
             for name, group in ShardSet(shards).sources.items()}, root)


def build_judge(block: dict, plugins: list[str]):
    from embedkit.config import registry, schema
    from embedkit.errors import ConfigError

    try:
        registry.load_plugins(plugins)
        return registry.build("judge", schema._component("judge", block, "embedding", "judge"))
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def main(args: list[str]) -> int:
    opts = VERB.parse(args)
    src, root = sources(opts.shards, opts.out)
    judge = build_judge(opts.judge_block(), opts.plugins)
    from embedkit.distributed.ranks import join_launched_group, leave_group, rank_and_world, rank_logger
    from embedkit.export.reader import ENCODER_KINDS, open_model
    from embedkit.mining.miner import Miner, MineSettings

    joined = join_launched_group()
    log = rank_logger()
    log(f"mine: model {opts.model}")
    encoder, model = open_model(opts.model, kinds=ENCODER_KINDS, trust_checkpoint=opts.trust_checkpoint)
    if opts.dtype:
        from embedkit.backbones.base import torch_dtype

        encoder.to(torch_dtype(opts.dtype))
    if opts.device:
        encoder.to(opts.device)
    settings = MineSettings(num_negatives=opts.num_negatives, window=tuple(opts.window),
                            threshold=opts.threshold, pick=opts.pick, seed=opts.seed,
                            batch_size=opts.batch_size, num_workers=opts.num_workers)
    stats = Miner(encoder, judge, src, opts.out, settings, log=log).run()
    if rank_and_world()[0] == 0:
        write_provenance(opts, src, root, model, judge, stats, log)
    if joined:
        leave_group()
    return 0


def write_provenance(opts: MineOptions, src: dict, root: Path, model, judge, stats: dict, log) -> None:
    """DST's shard-set manifest with the mining provenance; the summary line."""
    from embedkit.data.shard_set import write_manifest
    from embedkit.mining import provenance

    mining = {
        "source": str(root.resolve()),
        "source_shards": {rel: provenance.file_sha256(s) for group in src.values() for s, rel in group},
        "model": str(Path(opts.model).expanduser().resolve()),
        "model_sha256": provenance.model_sha256(model),
        "judge": {**opts.judge_block(), **judge.describe()}, "plugins": opts.plugins,
        "window": list(opts.window), "threshold": opts.threshold, "num_negatives": opts.num_negatives,
        "pick": opts.pick, "seed": opts.seed,
    }
    manifest = provenance.build_manifest(stats, mining)
    written = write_manifest(opts.out, manifest)
    m = manifest["mining"]
    log(f"mine: done: {sum(s['count'] for s in manifest['subsets'].values())} examples, {m['kept']} negatives "
        f"kept of {m['considered']} in the window; dropped {m['dropped']['duplicate']} duplicates, "
        f"{m['dropped']['false_negative']} false negatives; {m['short']} examples short of "
        f"{opts.num_negatives}; manifest {written}")
