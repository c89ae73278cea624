"""``embedkit eval``: MMEB evaluation of a checkpoint.

    embedkit eval [recipe=NAME] ckpt=PATH data.eval.root=DIR [data.eval.datasets=[A,B]] [out=DIR]
    embedkit eval model=DIR data.eval.root=DIR ...   # an export folder, a run dir, or any
                                                     # sentence-transformers folder (text only)
    embedkit eval recipe=NAME model.backbone.path=DIR data.eval.root=DIR ...
                                                     # a released checkpoint as the recipe builds it
                                                     # (e.g. LLaVE's llava_qwen weights, VLM2Vec's
                                                     # PEFT adapters; outputs in runs/eval-<recipe>/)
    embedkit eval ... quantize=binary|int8|[int8,binary] [rescore=true] [rescore_k=10]
    embedkit eval ... layer=L dim=D                # the model cut to its first L layers and D dims
    embedkit eval model=DIR data.eval.tasks=[T1,T2]  # corpus task folders (docs/eval-tasks.md), with or
                                                     # without data.eval.root: visual documents by NDCG@5,
                                                     # text<->video R@k, classification, moments
    embedkit eval ... data.eval.retrieval=muvera [data.eval.muvera.candidates=100]   # multi_vector models
    embedkit eval model=DIR benchmark=mmeb_v2[@version] data.eval.mmeb_v2_root=DIR [allow_missing=true]
                  [report=SCORES.json]               # MMEB-V2's pinned protocol (docs/mmeb-v2.md "Running it");
    embedkit eval model=DIR protocol_file=FILE.yaml data.eval.mmeb_v2_root=DIR   # or an edited protocol file

``benchmark=`` checks every task's data and counts before the model is opened (one error line naming
each missing task, exit 2; ``allow_missing=true`` scores the rest, marked partial), caches each task's
embeddings under ``<out>/mmeb_v2/cache/`` keyed by the model's and the task's fingerprints (a killed run
resumes), and writes ``<out>/mmeb_v2/results.json``, ``summary.json``/``summary.md`` (and ``report.md``
with ``report=``); ``eval/mmeb_v2/runner.py``.

``quantize`` also scores the same embeddings quantised (``eval/quantize.py``: binary codes by Hamming
distance, int8 by per-dimension scalar quantisation) and prints P@1 next to bytes per vector for float
and each mode; ``rescore=true`` adds binary with its top ``rescore_k`` candidates rescored by the float
query. The score files and the main table stay float; ``summary.json`` holds ``quantized`` per dataset and
MLflow gets ``eval/<Dataset>/p@1/<mode>``.

``layer``/``dim`` (2D Matryoshka / Starbucks) evaluate the model cut to that depth and embedding size
(``Encoder.cut``: the layers above are dropped; the embeddings of ``encode(layer=L, dim=D)``).
``summary.json`` records ``depth`` (layer, dim and the full model's); a cut model's outputs go to
``eval-l<L>_d<D>/`` instead of ``eval/`` and its MLflow metrics end in ``/l<L>_d<D>``
(``eval/overall/p@1/l1_d16``), so depths of one run sit side by side with the full model's.

``data.eval.retrieval=muvera`` (a ``model.pooling=multi_vector`` model only) ranks each query's
candidates by MUVERA's fixed-dimensional encodings and re-ranks its best ``data.eval.muvera.candidates``
by exact MaxSim (``eval/muvera.py``); the default, ``exact``, scores every candidate by MaxSim.

The model (architecture and weights) comes from the checkpoint, which carries its resolved config;
the command line supplies the eval settings: ``data.eval.*``, ``train.chunk_size`` (items per
forward pass), ``tracking.*``. Outputs go to ``out=`` (default ``<run dir>/eval/``, next to the
checkpoints folder): ``<Dataset>_score.json``, ``summary.json``, ``summary.md``, each written
atomically. Metrics (``eval/<Dataset>/p@1``, ``eval/<MetaTask>/p@1``, ``eval/IND/p@1``,
``eval/OOD/p@1``, ``eval/overall/p@1``; ``@`` stored as ``_at_``) and the summary files go to the
MLflow run that trained the checkpoint (found by its run name in its experiment), or else to a new
run named ``eval-<run name>`` tagged with the checkpoint path.

Under ``torchrun`` (WORLD_SIZE > 1) every process encodes a share of the distinct items; the result
is the one a single process gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from embedkit.commands._options import Verb, config_words, option
from embedkit.errors import UserError


@dataclass
class EvalOptions:
    ckpt: Optional[str] = option(None, "a checkpoint written by embedkit fit", metavar="PATH")
    model: Optional[str] = option(None, "an export folder, a run dir or a sentence-transformers folder",
                                  metavar="DIR")
    out: Optional[str] = option(None, "the output folder; null: <run dir>/eval/ (eval-l<L>_d<D>/ for a cut model)",
                                metavar="DIR")
    quantize: list[Literal["binary", "int8"]] = option([], "also score the embeddings quantised this way")
    rescore: bool = option(False, "also score binary codes with the top rescore_k rescored by the float query")
    rescore_k: int = option(10, "candidates rescored per query (rescore=true)", minimum=1, metavar="K")
    layer: Optional[int] = option(None, "evaluate the model cut to its first L layers; null: all", minimum=1,
                                  metavar="L")
    dim: Optional[int] = option(None, "evaluate the first D embedding dimensions; null: all", minimum=1,
                                metavar="D")
    trust_checkpoint: bool = option(False, "read a checkpoint you trust with the full unpickler (it may run code "
                                           "from the file); default: weights and embedkit's own states only")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = option(None, "run the model in this dtype; "
                                                                        "null: as stored")
    num_workers: int = option(0, "loader processes that tokenise and decode images ahead of the model; "
                                 "0: in this process", minimum=0)
    benchmark: Optional[str] = option(None, "mmeb_v2[@version]: every task of the pinned MMEB-V2 protocol, "
                                            "from data.eval.mmeb_v2_root (docs/mmeb-v2.md)", metavar="NAME[@VERSION]")
    protocol_file: Optional[str] = option(None, "benchmark: a protocol YAML (an edited copy of a shipped one) "
                                                "instead of a shipped version", metavar="FILE")
    allow_missing: bool = option(False, "benchmark: score the tasks found when some are missing or "
                                        "miscounted; every output is marked partial")
    report: Optional[str] = option(None, "benchmark: a published VLM2Vec score file to diff against, task by "
                                         "task, naming the pins that differ", metavar="FILE")
    overrides: list[str] = config_words()

    def __post_init__(self):
        if self.rescore and "binary" not in self.quantize:
            raise UserError("rescore: rescoring applies to binary codes; add quantize=binary")



VERB = Verb("eval", "MMEB and corpus-task evaluation: ckpt=PATH | model=DIR | model.backbone.path=PATH, and "
                    "data.eval.root=DIR and/or data.eval.tasks=[DIR,...]",
            EvalOptions, config=("data.eval", "train.chunk_size", "tracking"),
            words=(("model.backbone.path=PATH", "evaluate the recipe's model with these weights (e.g. a released "
                                                "checkpoint); outputs in runs/eval-<recipe>/"),))


def check_benchmark_words(opts: EvalOptions) -> None:
    """One-line errors for the ``benchmark=`` words used where they do not apply (checked by ``main``, not
    at parse time: each option alone is valid)."""
    benchmark_only = [k for k in ("allow_missing", "report") if getattr(opts, k)]
    if benchmark_only and not (opts.benchmark or opts.protocol_file):
        raise UserError(f"{benchmark_only[0]}: applies to benchmark=mmeb_v2 (or protocol_file=FILE) only")
    if opts.benchmark and opts.protocol_file:
        raise UserError("benchmark: give benchmark=mmeb_v2[@version] or protocol_file=FILE, not both")
    if opts.benchmark or opts.protocol_file:
        unsupported = [k for k in ("quantize", "layer", "dim") if getattr(opts, k)]
        if unsupported:
            raise UserError(f"{unsupported[0]}: not supported with benchmark= (it scores the full float model)")


def init_distributed() -> int:
    """Join the process group torchrun describes (if any); this process's rank."""
    from embedkit.distributed.ranks import join_launched_group, rank_and_world

    join_launched_group()
    return rank_and_world()[0]


def main(args: list[str]) -> int:
    from embedkit.config.loader import compose

    opts = VERB.parse(args)
    check_benchmark_words(opts)
    from_config = opts.ckpt is None and opts.model is None and any(
        a.startswith("model.backbone.path=") for a in opts.overrides)
    if (opts.ckpt is None) == (opts.model is None) and not from_config:
        raise UserError("eval: give ckpt=PATH (a checkpoint written by embedkit fit), model=DIR (an export "
                        "folder, a run dir or a sentence-transformers folder) or model.backbone.path=PATH "
                        "(weights the recipe's backbone loads, e.g. a released checkpoint)")
    cfg = compose(opts.overrides)
    if opts.benchmark or opts.protocol_file:
        return benchmark_main(opts, cfg, from_config)
    from embedkit.eval.run import MMEBRun

    run = MMEBRun(cfg["data"]["eval"], chunk_size=cfg["train"]["chunk_size"], quantize=opts.quantize,
                  rescore_k=opts.rescore_k if opts.rescore else None, dtype=opts.dtype, num_workers=opts.num_workers)
    rank = init_distributed()
    model, provenance = open_the_model(opts, cfg, from_config)
    result = run.evaluate(model, layer=opts.layer, dim=opts.dim, out=opts.out, recipe=cfg["recipe"], rank=rank,
                          log=lambda m: print(m, flush=True))
    if rank == 0 and cfg["tracking"]["enabled"]:
        from embedkit.tracking.eval_log import log_eval_result

        print(f"logged to MLflow run {log_eval_result(cfg['tracking'], provenance, result, cfg['recipe'])}")
    close_distributed()
    return 0


#: what ``model=`` accepts
MODEL_KINDS = ("checkpoint", "run", "export", "sentence_transformers")


def open_the_model(opts: EvalOptions, cfg: dict, from_config: bool):
    """(model, provenance) of ``ckpt=``, ``model=`` or the recipe's ``model.backbone.path=``."""
    from embedkit.export.reader import open_model

    what = "ckpt" if opts.ckpt is not None else "model"
    kinds = ("checkpoint",) if what == "ckpt" else ("config",) if from_config else MODEL_KINDS
    return open_model(getattr(opts, what), recipe=cfg, what=what, kinds=kinds, trust_checkpoint=opts.trust_checkpoint)


def benchmark_main(opts: EvalOptions, cfg: dict, from_config: bool) -> int:
    """``benchmark=mmeb_v2[@version]`` / ``protocol_file=``: the data checked before the model is opened
    (one report of what is missing), then every task encoded (resumable from the cache) and scored; rank 0
    writes ``<out>/mmeb_v2/`` and logs to MLflow when tracking is on (``eval/mmeb_v2/runner.py``)."""
    from pathlib import Path

    from embedkit.eval.mmeb_v2 import runner
    from embedkit.eval.mmeb_v2.cache import EmbeddingCache, model_fingerprint
    from embedkit.eval.mmeb_v2.protocol import load_protocol, protocol_from_file
    from embedkit.eval.run import output_dir

    protocol = protocol_from_file(opts.protocol_file) if opts.protocol_file else load_protocol(opts.benchmark)
    if opts.report:  # read now: a bad score file is found before hours of encoding, not after
        from embedkit.eval.mmeb_v2.report import read_published

        read_published(opts.report)
    prepared = runner.prepare(protocol, cfg["data"]["eval"]["mmeb_v2_root"], opts.allow_missing)
    rank = init_distributed()
    model, provenance = open_the_model(opts, cfg, from_config)
    log = (lambda m: print(m, flush=True)) if rank == 0 else None
    # the model's config too: a system prompt or pixel cap changes embeddings without touching a weight
    fingerprint = model_fingerprint(model, {"normalize": getattr(model, "normalize", True), "dtype": opts.dtype,
                                            "model": provenance.config.get("model")})
    encode, encode_candidates = (runner.model_encoder(model, cfg["train"]["chunk_size"], opts.dtype, opts.num_workers,
                                                      side) for side in (None, "candidate"))
    out = Path(opts.out) if opts.out else output_dir(provenance, None, cfg["recipe"])
    cache = EmbeddingCache(out / "mmeb_v2" / "cache", fingerprint)
    records = runner.evaluate(prepared, encode, cache, normalize=getattr(model, "normalize", True), log=log,
                              encode_candidates=encode_candidates)
    if rank == 0:
        info = {"fingerprint": fingerprint, "kind": provenance.kind, "source": str(provenance.source),
                "step": provenance.step}
        result, summary = runner.finish(out, protocol, info, records, prepared, report_file=opts.report, log=log)
        if cfg["tracking"]["enabled"]:
            print(f"logged to MLflow run {log_benchmark(cfg, provenance, result, summary, out / 'mmeb_v2')}")
    close_distributed()
    return 0


def log_benchmark(cfg: dict, provenance, result: dict, summary, folder) -> str:
    """The leaderboard metrics (``mmeb_v2/overall``, groups; ``mmeb_v2_partial/`` when partial), each task's
    score (``mmeb_v2/task/<name>``), the protocol's and the model's fingerprints as tags and the output
    files, to the training run of the model (else a new ``eval-<name>`` run), as ``log_eval_result`` does."""
    from pathlib import Path

    from embedkit.eval.mmeb_v2 import summary as leaderboard
    from embedkit.tracking.eval_log import log_eval
    from embedkit.tracking.mlflow_setup import tracking_uri

    trained, head = provenance.config, result["protocol"]
    run = trained.get("run", {})
    source = Path(provenance.checkpoint or provenance.source or ".")
    name = run.get("name") or (f"eval-{cfg['recipe']}" if provenance.kind == "config" else source.stem)
    metrics = {**leaderboard.metric_items(summary),
               **{f"mmeb_v2/task/{n}": 100.0 * r["score"] for n, r in result["tasks"].items()}}
    tags = {"embedkit.eval.ckpt": str(source.resolve()), "embedkit.mmeb_v2.version": head["version"],
            "embedkit.mmeb_v2.protocol_fingerprint": head["fingerprint"],
            "embedkit.mmeb_v2.model_fingerprint": result["model"]["fingerprint"],
            "embedkit.mmeb_v2.partial": str(result["partial"]).lower()}
    files = [folder / f for f in ("results.json", "summary.json", "summary.md", "report.md") if (folder / f).is_file()]
    return log_eval(tracking_uri(cfg["tracking"]), trained.get("tracking", {}).get("experiment")
                    or cfg["tracking"]["experiment"], name, run.get("dir"), tags=tags, metrics=metrics, files=files,
                    step=provenance.step, artifact_path="mmeb_v2")


def close_distributed() -> None:
    """Wait for every rank, then leave the process group (if one was joined)."""
    from embedkit.distributed.ranks import leave_group

    leave_group()
