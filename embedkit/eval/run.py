"""``MMEBRun``: one ``embedkit eval`` of an opened model: its settings checked, the model cut, scored,
the outputs written. The verb opens the model (``export/reader.open_model``) and hands it in.

    run = MMEBRun(cfg["data"]["eval"], chunk_size=16, quantize=["binary"], rescore_k=10)  # user errors first
    result = run.evaluate(model, layer=1, dim=16, out=None, recipe="demo", rank=0)

Outputs go to ``out`` or, by default, to ``output_dir``: the run dir's ``eval/`` (``eval-l<L>_d<D>/``
for a model cut to a depth) for a checkpoint or run dir, the folder's own ``eval*/`` for an export
or a sentence-transformers folder, and ``runs/eval-<recipe>/`` for a recipe's model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from embedkit.errors import UserError
from embedkit.files import write_atomic
from embedkit.runs import RunDir, eval_folder


@dataclass
class EvalResult:
    """What one evaluation wrote: the summary, its folder, the depth tag (``l<L>_d<D>``, None for the
    full model), the eval root; what ``tracking.eval_log.log_eval_result`` logs."""

    summary: dict
    out_dir: Path
    tag: str | None
    root: str

    @property
    def folder(self) -> str:
        """The artifact folder of these outputs (``eval`` or ``eval-<tag>``), whatever ``out`` was."""
        return eval_folder(self.tag)

    def metrics(self) -> dict[str, float]:
        """Metric display names -> values; a cut model's names end in ``/<tag>``."""
        from embedkit.eval import mmeb
        from embedkit.eval.corpus_tasks import metric_items

        items = mmeb.metric_items(self.summary) if self.summary.get("datasets") else {}
        items.update(metric_items(self.summary.get("tasks", {})))
        return {f"{k}/{self.tag}" if self.tag else k: v for k, v in items.items()}

    def files(self) -> list[Path]:
        return [self.out_dir / "summary.json", self.out_dir / "summary.md"]


def depth_tag(depth: dict) -> str | None:
    """``l<layer>_d<dim>`` for a cut model, None for the full one (its names stay as they are)."""
    if (depth["layer"], depth["dim"]) == (depth["num_layers"], depth["embedding_dim"]):
        return None
    return f"l{depth['layer']}_d{depth['dim']}"


def cut_model(model, layer: int | None, dim: int | None) -> dict | None:
    """Cut an ``Encoder`` to ``layer`` layers and ``dim`` dims in place; its depth record
    (``layer``, ``dim``, the full ``num_layers``, ``embedding_dim``), or None for a model that
    cannot be cut (a sentence-transformers folder; a one-line error when a cut is asked of it)."""
    if not hasattr(model, "cut"):
        if layer or dim:
            raise UserError(f"{'layer' if layer else 'dim'}: {model.provenance.source} is a sentence-transformers "
                            "folder, which embedkit cannot cut; give an embedkit export, run dir or checkpoint")
        return None
    full = {"num_layers": model.backbone.num_layers, "embedding_dim": model.embedding_dim}
    model.cut(layer=layer, dim=dim)
    return {"layer": model.backbone.num_layers, "dim": model.embedding_dim, **full}


def output_dir(provenance, tag: str | None, recipe: str) -> Path:
    """The default output folder of an evaluation (see the module docstring)."""
    if provenance.kind == "config":
        base = Path(f"runs/eval-{recipe}")
        return base / eval_folder(tag) if tag else base
    if provenance.kind == "checkpoint":
        ckpt = Path(provenance.checkpoint)
        run = RunDir.of_checkpoint(ckpt) or RunDir(ckpt.resolve().parent)
    else:
        run = RunDir(Path(provenance.source).resolve())
    return run.eval_dir(tag)


def item_settings(model) -> tuple[dict, dict]:
    """How a model's task rows become items: ``RowItems`` options (its frame policy and image cap,
    ``Encoder.decoding``; none for a sentence-transformers folder) and the record a result carries: those
    plus the backbone's pixel caps (``*pixels*`` and ``resize`` keys of its config)."""
    decoding = getattr(model, "decoding", None)
    if decoding is None:
        return {}, {}
    from dataclasses import asdict

    backbone = ((getattr(model, "provenance", None) and model.provenance.config) or {}).get("model", {}).get("backbone", {})
    caps = {k: v for k, v in backbone.items() if ("pixels" in k or k == "resize") and v is not None}
    record = {"frames": asdict(decoding.policy), **caps}
    if decoding.max_image_pixels is not None:
        record["max_image_pixels"] = decoding.max_image_pixels
    return {"policy": decoding.policy, "max_pixels": decoding.max_image_pixels}, record


class MMEBRun:
    """The ``data.eval`` section read and checked (datasets found, MUVERA settings) before any
    model is built; ``evaluate`` scores a model with it. ``chunk_size``: items per forward pass;
    ``dtype``: the model cast to it (None: as stored); ``num_workers``: the inference engine's loader
    processes (``embedkit/inference.py``)."""

    def __init__(self, section: dict, *, chunk_size: int, quantize: list[str], rescore_k: int | None,
                 dtype: str | None = None, num_workers: int = 0):
        from embedkit.eval import mmeb
        from embedkit.eval.corpus_tasks import read_task
        from embedkit.eval.muvera import MuveraRetrieval

        self.manifest = mmeb.load_manifest()
        self.root = section["root"]
        self.tasks = [read_task(folder) for folder in section["tasks"]]
        only_tasks = self.tasks and not self.root and not section["datasets"]
        self.datasets = [] if only_tasks else mmeb.resolve_datasets(self.root, section["datasets"], self.manifest)
        self.muvera = MuveraRetrieval.from_config(section["muvera"]) if section["retrieval"] == "muvera" else None
        self.chunk_size, self.quantize, self.rescore_k = chunk_size, quantize, rescore_k
        self.dtype, self.engine = dtype, {"num_workers": num_workers} if num_workers else {}

    def check(self, model) -> None:
        """One-line errors for a scoring mode the model cannot take, before anything is encoded."""
        from embedkit.eval.quantize import check_quantizable

        if self.muvera is not None:
            self.muvera.check_model(model)
        check_quantizable(model, self.quantize)

    def evaluate(self, model, *, layer: int | None, dim: int | None, out: str | Path | None, recipe: str,
                 rank: int = 0, log: Callable[[str], None] = print) -> EvalResult:
        """Cut ``model`` (``layer``/``dim``), score it on every dataset (every rank calls this), and on
        rank 0 write the outputs and print the table."""
        import torch

        from embedkit.eval import mmeb

        depth = cut_model(model, layer, dim)
        tag = depth_tag(depth) if depth else None
        out_dir = Path(out) if out else output_dir(model.provenance, tag, recipe)
        self.check(model)
        if self.dtype:
            from embedkit.backbones.base import torch_dtype

            model.to(torch_dtype(self.dtype))
        if torch.cuda.is_available():
            model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
        encode = lambda items: model.encode_items(items, self.chunk_size, **self.engine)  # noqa: E731
        # candidates framed as the model frames documents (GME, Qwen3-VL-Embedding: their own system message)
        encode_candidates = lambda items: model.encode_items(items, self.chunk_size, side="candidate", **self.engine)  # noqa: E731
        summary = mmeb.evaluate(
            self.root, self.datasets, encode, normalize=model.normalize, manifest=self.manifest,
            encode_candidates=encode_candidates,
            log=log if rank == 0 else None, quantize=self.quantize, rescore_k=self.rescore_k, muvera=self.muvera,
        ) if self.datasets else {}
        if self.tasks:
            summary["tasks"] = self.score_tasks(model, (encode, encode_candidates), log if rank == 0 else None)
        if depth:
            summary["depth"] = depth
        result = EvalResult(summary, out_dir, tag, str(self.root))
        if rank == 0:
            self.report(result, depth, log)
        return result

    def score_tasks(self, model, encoders, log: Callable[[str], None] | None) -> dict:
        """Every corpus task scored (``eval/corpus_tasks.py``), each result with the item settings it used;
        ``encoders``: (queries', corpus's)."""
        from embedkit.eval.corpus_tasks import evaluate_task

        options, record = item_settings(model)
        results = {}
        for i, task in enumerate(self.tasks):
            if log:
                log(f"[task {i + 1}/{len(self.tasks)}] {task.name} ({task.kind})")
            results[task.name] = evaluate_task(task, encoders[0], normalize=model.normalize, item_options=options,
                                               log=log, encode_candidates=encoders[1])
            results[task.name]["items"] = record
            if log:
                log(f"  {task.name}: {task.main} {results[task.name]['score']:.4f}")
        return results

    def report(self, result: EvalResult, depth: dict | None, log: Callable[[str], None]) -> None:
        from embedkit.eval import corpus_tasks, mmeb

        at = (f" at layer {depth['layer']}/{depth['num_layers']}, dim {depth['dim']}/{depth['embedding_dim']}"
              if result.tag else "")
        tables = []
        if result.summary.get("datasets"):
            tables.append(mmeb.markdown_table(result.summary, self.manifest))
            mmeb.write_score_files(result.out_dir, result.summary)
        if result.summary.get("tasks"):
            tables.append(corpus_tasks.markdown_table(result.summary["tasks"]))
        write_atomic(result.out_dir / "summary.json", json.dumps(result.summary, indent=2) + "\n")
        write_atomic(result.out_dir / "summary.md", "\n".join(tables))
        log("\n".join(tables).rstrip("\n"))
        if result.summary.get("datasets"):
            log(f"overall P@1 {result.summary['aggregate']['overall']:.4f}{at} over "
                f"{len(result.summary['datasets'])} datasets; files in {result.out_dir}")
        for name, r in result.summary.get("tasks", {}).items():
            log(f"{name}: {r['main']} {r['score']:.4f}{at}; files in {result.out_dir}")
