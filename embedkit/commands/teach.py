"""``embedkit teach``: copy a shard set, adding each example's teacher embeddings (and judge scores).

    embedkit teach model=TEACHER shards=SRC out=DST [judge=NAME] [judge.PARAM=VALUE ...]
                   [store_dtype=float16|float32] [batch_size=32] [num_workers=0] [device=cpu|cuda]
                   [dtype=float32|bfloat16|float16] [plugins=[mod,...]]

TEACHER is any model ``embedkit eval model=`` opens: a run dir (its newest checkpoint), a checkpoint,
an export folder or a sentence-transformers folder. Every example of SRC gets the teacher's embeddings
of its query, positive and own hard negatives (``<key>.teacher.npy``); with ``judge=NAME`` (a registered
judge, as ``embedkit mine judge=``; a reranker or VLM judge through ``plugins=``) also the judge's scores
of its own candidates (``<key>.teacher_scores.npy``). DST/manifest.json records the provenance (the
teacher's sha256, the judge, the embeddings' dim and dtype). Killed and re-run, it resumes; the bytes
are the same as an uninterrupted run's. Train on it with ``embedkit fit data.train.shards=DST
loss=distill`` (or ``loss=soft_labels``). See ``embedkit/mining/teacher.py`` and docs/distillation.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from embedkit.commands._options import Verb, option


@dataclass
class TeachOptions:
    model: str = option(help="the teacher: a run dir, a checkpoint, an export or a sentence-transformers folder",
                        metavar="PATH")
    shards: str = option(help="the shard set to teach (a folder of subset folders of .tar shards)", metavar="SRC")
    out: str = option(help="the folder for the taught shards and their manifest", metavar="DST")
    judge: Optional[str] = option(None, "also store this judge's scores of each example's own candidates "
                                        "(a registered judge name); null: embeddings only", metavar="NAME")
    judge_params: dict[str, str] = option({}, "one of the judge's parameters (repeatable)", prefix="judge",
                                          metavar="VALUE")
    store_dtype: Literal["float16", "float32"] = option("float16", "the dtype of the stored embeddings")
    batch_size: int = option(32, "items per forward pass", minimum=1)
    device: Optional[str] = option(None, "cpu, cuda, cuda:1 ...; null: the CPU", metavar="DEVICE")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = option(None, "run the teacher in this dtype; "
                                                                        "null: as stored")
    num_workers: int = option(0, "loader processes that decode and process images ahead of the model; "
                                 "0: in this process", minimum=0)
    plugins: list[str] = option([], "modules to import first (they register judges)", metavar="[MODULE,...]")
    trust_checkpoint: bool = option(False, "read a checkpoint you trust with the full unpickler (it may run code "
                                           "from the file); default: weights and embedkit's own states only")


VERB = Verb("teach", "teacher embeddings (and judge scores) into shards, for distillation", TeachOptions)


def main(args: list[str]) -> int:
    opts = VERB.parse(args)
    from embedkit.commands.mine import build_judge, sources

    src, root = sources(opts.shards, opts.out)
    judge = build_judge({"name": opts.judge, **opts.judge_params}, opts.plugins) if opts.judge else None
    from embedkit.export.reader import ENCODER_KINDS, open_model
    from embedkit.mining.teacher import Teach, TeachSettings

    status = _printer()
    status(f"teach: model {opts.model}")
    # a sentence-transformers folder too (text only: UniME stage 1 distils a text embedder on text pairs)
    encoder, model = open_model(opts.model, kinds=(*ENCODER_KINDS, "sentence_transformers"),
                                trust_checkpoint=opts.trust_checkpoint)
    if opts.dtype:
        from embedkit.backbones.base import torch_dtype

        encoder.to(torch_dtype(opts.dtype))
    if opts.device:
        encoder.to(opts.device)
    settings = TeachSettings(batch_size=opts.batch_size, num_workers=opts.num_workers, store_dtype=opts.store_dtype)
    shards = [pair for group in src.values() for pair in group]
    stats = Teach(encoder, judge, shards, opts.out, settings, log=status).run()
    write_provenance(opts, src, root, model, judge, stats, status)
    return 0


def _printer():
    return lambda message: print(message, flush=True)


def write_provenance(opts: TeachOptions, src: dict, root: Path, model, judge, stats: dict, status) -> None:
    """DST's shard-set manifest with the teaching provenance; the summary line."""
    from embedkit.data.shard_set import ShardSet, write_manifest
    from embedkit.mining import provenance
    from embedkit.mining.teacher import build_manifest

    shard_set = ShardSet([s for group in src.values() for s, _ in group])
    teaching = {
        "source": str(root.resolve()),
        "source_shards": {rel: provenance.file_sha256(s) for group in src.values() for s, rel in group},
        "model": str(Path(opts.model).expanduser().resolve()),
        "model_sha256": provenance.model_sha256(model),
        "judge": None if judge is None else {"name": opts.judge, **opts.judge_params, **judge.describe()},
        "plugins": opts.plugins, "dtype": opts.store_dtype, "members": _members(judge is not None),
    }
    # each subset's source record (query modality ...), by the subset name the manifest files it under
    entries = {Path(group[0][1]).parent.name or ".": shard_set.entry(name) for name, group in src.items()}
    manifest = build_manifest(stats, entries, teaching)
    written = write_manifest(opts.out, manifest)
    t = manifest["teaching"]
    status(f"teach: done: {t['examples']} examples, embeddings of dim {t['dim']} ({opts.store_dtype})"
           f"{', judge scores' if judge is not None else ''}; manifest {written}")


def _members(scored: bool) -> dict:
    from embedkit.data.shards import TEACHER_MEMBERS

    return {k: v for k, v in TEACHER_MEMBERS.items() if scored or k != "scores"}
