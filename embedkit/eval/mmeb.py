"""The MMEB evaluation protocol: read datasets, de-duplicate, encode (split across ranks), score.

Protocol (as VLM2Vec's eval script runs it, arXiv 2410.05160): every row of a dataset has a query
(``qry_text``, ``qry_img_path``) and a candidate list (``tgt_text``, ``tgt_img_path``, two parallel
lists) whose first entry is the answer. The distinct queries and the distinct candidates, each keyed
by ``(text, image path)``, are encoded once; each query is ranked against its own row's list and
Precision@1 is the share of rows whose top candidate is candidate 0 (``retrieval.py``).

Folder layout of ``data.eval.root`` (the Hugging Face dataset TIGER-Lab/MMEB-eval as downloaded,
plus its image archive unpacked into ``images/``)::

    <root>/<Dataset>/test.parquet | test-*.parquet | test.jsonl     one file per dataset
    <root>/images/<...>                                             the images

Image paths in the files are relative: each is looked up as ``<root>/images/<path>``, then as
``<root>/<path>``. An empty path means no image, an empty text means no text. Dataset names are
those of ``data/mmeb/eval.yaml``.

Nothing here knows about models: ``encode(items: Sequence[Item]) -> Tensor[N, D]`` is any callable, so
the protocol is tested with fake encoders. It gets a rank's whole share of the distinct items at once,
as ``KeyItems`` (made on demand: an image is decoded when it is read, its size read from the file's
header for the costs), and batches it itself: a model's ``encode_items`` goes through the inference
engine (``embedkit/inference.py``), which orders the share by token cost, so no corpus is held decoded.
Under ``torch.distributed`` each rank encodes a contiguous share of the distinct items and the shares
are gathered, so every rank ends with the same embeddings and the same scores as one process would
(the encoder must not depend on what else is in the batch, which the pooling contract already demands).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import yaml

from embedkit.data.schema import Item
from embedkit.distributed.ranks import rank_and_world, shard_bounds  # noqa: F401 (shard_bounds: its old home)
from embedkit.errors import UserError
from embedkit.eval import retrieval
from embedkit.eval.muvera import MuveraRetrieval, muvera_row_scores
from embedkit.fault_points import fault_point
from embedkit.files import write_atomic
from embedkit.inference import LazyItems, encode_shared

#: ``encode(items) -> Tensor[len(items), D]``: any callable that embeds a sequence of items (it batches them)
EncodeFn = Callable[[Sequence[Item]], torch.Tensor]

COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
FILE_PATTERNS = ("test.parquet", "test-*.parquet", "test.jsonl")


@dataclass
class Row:
    qry_text: str
    qry_img_path: str
    tgt_text: list[str]
    tgt_img_path: list[str]


# ---------------------------------------------------------------- manifest and files


def load_manifest(path: str | Path | None = None) -> dict[str, dict]:
    """``{dataset: {meta_task, split, candidates}}`` in the manifest's order."""
    from embedkit.data.manifests import manifest_path

    data = yaml.safe_load(Path(path or manifest_path("eval.yaml")).read_text())
    return dict(data["datasets"])


def dataset_files(root: Path, name: str) -> list[Path]:
    folder = root / name
    for pattern in FILE_PATTERNS:
        found = sorted(folder.glob(pattern))
        if found:
            return found
    return []


def available(root: str | Path, manifest: dict[str, dict]) -> list[str]:
    """Manifest datasets that have a data file under ``root``."""
    root = Path(root)
    return [name for name in manifest if dataset_files(root, name)]


def resolve_datasets(root: str | Path | None, names: Sequence[str], manifest: dict[str, dict]) -> list[str]:
    """The datasets to evaluate (``names``, or all found under root); UserError naming the choices."""
    if not root:
        raise UserError("data.eval.root: not set; give data.eval.root=DIR (a folder of MMEB eval datasets) "
                        "or data.eval.tasks=[DIR,...] (corpus task folders, docs/eval-tasks.md)")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data.eval.root: folder not found: {root}")
    found = available(root, manifest)
    listing = ", ".join(found) if found else "none found"
    expect = "<root>/<Dataset>/" + "|".join(FILE_PATTERNS)
    unknown = [n for n in names if n not in manifest]
    if unknown:
        raise UserError(
            f"data.eval.datasets: {', '.join(map(repr, unknown))} not in data/mmeb/eval.yaml; "
            f"available under {root}: {listing}"
        )
    missing = [n for n in names if n not in found]
    if missing:
        raise UserError(
            f"data.eval.datasets: no eval file for {', '.join(missing)} ({expect}); "
            f"available under {root}: {listing}"
        )
    if not names and not found:
        raise UserError(f"data.eval.root: no MMEB eval dataset under {root} ({expect}); available: none")
    return list(names) if names else found


def read_rows(path: Path) -> list[Row]:
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        import pyarrow.parquet as pq

        records = pq.read_table(path, columns=list(COLUMNS)).to_pylist()
    rows = []
    for i, rec in enumerate(records):
        missing = [c for c in COLUMNS if c not in rec]
        if missing:
            raise UserError(f"{path}: row {i} lacks {', '.join(missing)} (MMEB eval columns: {', '.join(COLUMNS)})")
        texts = [t or "" for t in rec["tgt_text"]]
        paths = [p or "" for p in rec["tgt_img_path"]]
        if not texts or len(texts) != len(paths):
            raise UserError(f"{path}: row {i}: tgt_text and tgt_img_path must be non-empty lists of one length")
        rows.append(Row(rec["qry_text"] or "", rec["qry_img_path"] or "", texts, paths))
    return rows


def load_dataset(root: str | Path, name: str, max_rows: int | None = None) -> list[Row]:
    rows: list[Row] = []
    for path in dataset_files(Path(root), name):
        rows.extend(read_rows(path))
        if max_rows is not None and len(rows) >= max_rows:
            break
    return rows[:max_rows] if max_rows is not None else rows


def resolve_image(root: Path, rel: str) -> Path:
    for base in (root / "images", root):
        if (base / rel).is_file():
            return base / rel
    raise UserError(f"image not found: {rel} (looked in {root / 'images'} and {root})")


def make_item(root: Path, key: tuple[str, str]) -> Item:
    text, img = key
    image = None
    if img:
        from PIL import Image

        with Image.open(resolve_image(root, img)) as im:
            image = im.convert("RGB")
    if not text and image is None:
        raise UserError(f"an MMEB entry has neither text nor image under {root}")
    return Item(text=text or None, image=image)


# ---------------------------------------------------------------- encoding


def unique_keys(keys: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[int]]:
    """Distinct keys in first-occurrence order, and each input's position among them."""
    pos: dict[tuple[str, str], int] = {}
    index = []
    for k in keys:
        index.append(pos.setdefault(k, len(pos)))
    return list(pos), index


class KeyItems(LazyItems):
    """The entries ``keys`` (text, image path) of ``root`` as ``Item``s made on demand: ``self[i]`` opens
    and decodes the image; ``sized(i)`` reads its size only (the engine's costs). Picklable."""

    def __init__(self, root: Path, keys: Sequence[tuple[str, str]]):
        self.root, self.keys = root, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Item:
        return make_item(self.root, self.keys[i])

    def sized(self, i: int) -> Item:
        text, img = self.keys[i]
        if not img:
            return make_item(self.root, self.keys[i])
        from PIL import Image

        with Image.open(resolve_image(self.root, img)) as im:  # the header only; closed, never decoded
            return Item(text=text or None, image=im)


def encode_keys(keys: Sequence[tuple[str, str]], encode: EncodeFn, root: Path) -> torch.Tensor:
    """Embeddings ``[len(keys), D]``: this rank encodes its share (one ``encode`` call, ``KeyItems``),
    then all shares are gathered (``inference.encode_shared``)."""
    return encode_shared(KeyItems(root, list(keys)), encode)


# ---------------------------------------------------------------- one dataset, several datasets


def evaluate_rows(
    rows: Sequence[Row],
    encode: EncodeFn,
    root: str | Path,
    normalize: bool = True,
    encode_candidates: EncodeFn | None = None,
    quantize: Sequence[str] = (),
    rescore_k: int | None = None,
    muvera: MuveraRetrieval | None = None,
) -> dict:
    """Scores of one dataset: the reference's ``acc/num_correct/num_pred`` plus recall@k, MRR, ties.

    ``muvera`` (``data.eval.retrieval=muvera``, token-vector sets only): each query's candidates are
    ranked by MUVERA's FDE and its best are re-ranked by exact MaxSim (``muvera.muvera_row_scores``);
    ``details["muvera"]`` holds the FDE size, bytes per set and the scoring seconds.

    ``quantize`` (``binary``, ``int8``) adds ``quantized[mode] = {acc, bytes_per_vector, ties_at_top}``
    scored on quantised embeddings (``eval/quantize.py``); with ``rescore_k`` binary is also scored with
    the top ``rescore_k`` candidates rescored by the float query (``binary_rescore``)."""
    root = Path(root)
    queries, q_index = unique_keys([(r.qry_text, r.qry_img_path) for r in rows])
    flat = [(t, p) for r in rows for t, p in zip(r.tgt_text, r.tgt_img_path)]
    cands, flat_index = unique_keys(flat)
    c_index, at = [], 0
    for r in rows:
        c_index.append(flat_index[at : at + len(r.tgt_text)])
        at += len(r.tgt_text)
    q_emb = encode_keys(queries, encode, root)
    c_emb = encode_keys(cands, encode_candidates or encode, root)
    if muvera is not None:
        scores, muvera_info = muvera_row_scores(q_emb, c_emb, q_index, c_index, muvera, normalize=normalize)
    else:
        scores = retrieval.row_scores(q_emb, c_emb, q_index, c_index, normalize=normalize)
    result = retrieval.precision_at_1(scores)
    details = retrieval.ranking_metrics(scores)
    if muvera is not None:
        details["muvera"] = muvera_info
    details["ties_at_top"] = int(retrieval.top_ties(scores).sum())
    details["candidates"] = max(len(c) for c in c_index) if c_index else 0
    details["unique_queries"] = len(queries)
    details["unique_candidates"] = len(cands)
    out = {**result, "details": details}
    if quantize:
        out["quantized"] = quantized_scores(q_emb, c_emb, q_index, c_index, quantize, normalize, rescore_k,
                                            float_acc=result["acc"], float_ties=details["ties_at_top"])
    return out


def quantized_scores(q_emb, c_emb, q_index, c_index, modes, normalize, rescore_k, *, float_acc, float_ties) -> dict:
    """``{mode: {acc, bytes_per_vector, ties_at_top}}`` for float and each quantisation mode."""
    from embedkit.eval import quantize

    dim = int(q_emb.shape[1])
    out = {"float": {"acc": float_acc, "bytes_per_vector": quantize.bytes_per_vector("float", dim),
                     "ties_at_top": float_ties}}
    runs = [(m, m, False) for m in modes]
    if rescore_k and "binary" in modes:
        runs.append(("binary_rescore", "binary", True))
    for name, mode, rescore in runs:
        scores = quantize.quantized_row_scores(q_emb, c_emb, q_index, c_index, mode, normalize=normalize,
                                               rescore=rescore, rescore_k=rescore_k or 1)
        out[name] = {"acc": retrieval.precision_at_1(scores)["acc"],
                     "bytes_per_vector": quantize.bytes_per_vector(mode, dim),
                     "ties_at_top": int(retrieval.top_ties(scores).sum())}
    return out


def evaluate(
    root: str | Path,
    datasets: Sequence[str],
    encode: EncodeFn,
    *,
    normalize: bool = True,
    max_rows: int | None = None,
    out_dir: str | Path | None = None,
    manifest: dict[str, dict] | None = None,
    encode_candidates: EncodeFn | None = None,
    log: Callable[[str], None] | None = None,
    quantize: Sequence[str] = (),
    rescore_k: int | None = None,
    muvera: MuveraRetrieval | None = None,
) -> dict:
    """Evaluate ``datasets`` (all found under root when empty); write outputs on rank 0.

    ``encode`` embeds a rank's share of a dataset's distinct items at once and batches it. Returns the summary:
    ``{"datasets": {name: score dict}, "aggregate": {...}}``. Every rank must call this under
    torch.distributed (the encodings are gathered).
    """
    manifest = manifest or load_manifest()
    names = resolve_datasets(root, list(datasets), manifest)
    results = {}
    for i, name in enumerate(names):
        if log:
            log(f"[{i + 1}/{len(names)}] {name}")
        rows = load_dataset(root, name, max_rows)
        results[name] = evaluate_rows(rows, encode, root, normalize, encode_candidates,
                                      quantize=quantize, rescore_k=rescore_k, muvera=muvera)
        fault_point("eval_dataset")
        if log:
            log(f"  {name}: P@1 {results[name]['acc']:.4f} ({results[name]['num_correct']}/{results[name]['num_pred']})")
            info = results[name]["details"].get("muvera")
            if info:
                log(f"  MUVERA: FDE of {info['fde_numbers']} numbers ({info['fde_bytes']} B per set; token sets "
                    f"{info['token_set_bytes']:.0f} B), best {info['reranked']} re-ranked by MaxSim, "
                    f"scored in {info['seconds']:.2f}s")
    summary = {
        "datasets": results,
        "aggregate": retrieval.aggregate({n: r["acc"] for n, r in results.items()}, manifest),
    }
    if out_dir is not None and rank_and_world()[0] == 0:
        write_outputs(out_dir, summary, manifest)
    return summary


def validation_metrics(
    encode: EncodeFn,
    root: str | Path,
    datasets: Sequence[str] = (),
    max_rows: int = 100,
    normalize: bool = True,
    prefix: str = "val",
) -> dict[str, float]:
    """For validation during fit: ``{"<prefix>/<dataset>/p@1": acc, "<prefix>/p@1": mean}``.

    Uses the first ``max_rows`` rows of each dataset. Call it on every rank under DDP (each rank
    encodes a share); every rank gets the same numbers. The metric names keep ``@``; the MLflow logger
    maps it (``tracking.store.stored_name``).
    """
    summary = evaluate(root, datasets, encode, normalize=normalize, max_rows=max_rows)
    out = {f"{prefix}/{name}/p@1": r["acc"] for name, r in summary["datasets"].items()}
    out[f"{prefix}/p@1"] = summary["aggregate"]["overall"]
    return out


# ---------------------------------------------------------------- outputs


def write_score_files(out_dir: str | Path, summary: dict) -> list[Path]:
    """``<Dataset>_score.json`` per dataset, in the reference's shape."""
    written = []
    for name, r in summary["datasets"].items():
        path = Path(out_dir) / f"{name}_score.json"
        write_atomic(path, json.dumps({k: r[k] for k in ("acc", "num_correct", "num_pred")}, indent=4) + "\n")
        written.append(path)
    return written


def write_outputs(out_dir: str | Path, summary: dict, manifest: dict[str, dict]) -> list[Path]:
    """``<Dataset>_score.json`` (the reference's shape), ``summary.json`` and ``summary.md``."""
    out_dir = Path(out_dir)
    written = write_score_files(out_dir, summary)
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out_dir / "summary.md", markdown_table(summary, manifest))
    return written + [out_dir / "summary.json", out_dir / "summary.md"]


def metric_items(summary: dict) -> dict[str, float]:
    """Display names (``eval/<name>/p@1``, ``eval/<name>/recall@5`` ...) of everything the summary holds."""
    out = {f"eval/{name}/p@1": r["acc"] for name, r in summary["datasets"].items()}
    agg = summary["aggregate"]
    out.update({f"eval/{task}/p@1": v for task, v in agg["meta_task"].items()})
    for group in ("IND", "OOD", "overall"):
        if agg[group] is not None:
            out[f"eval/{group}/p@1"] = agg[group]
    for name, r in summary["datasets"].items():
        for mode, q in r.get("quantized", {}).items():
            if mode != "float":
                out[f"eval/{name}/p@1/{mode}"] = q["acc"]
        for k in ("recall@5", "recall@10", "mrr"):
            if k in r["details"]:
                out[f"eval/{name}/{k}"] = r["details"][k]
    return out


def markdown_table(summary: dict, manifest: dict[str, dict]) -> str:
    lines = [
        "| dataset | meta-task | split | candidates | P@1 | R@5 | MRR |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, r in summary["datasets"].items():
        info, d = manifest[name], r["details"]
        lines.append(
            f"| {name} | {info['meta_task']} | {info['split']} | {d['candidates']} | "
            f"{100 * r['acc']:.2f} | {100 * d.get('recall@5', float('nan')):.2f} | {d.get('mrr', float('nan')):.4f} |"
        )
    agg = summary["aggregate"]
    lines += ["", "| group | datasets | P@1 |", "|---|---:|---:|"]
    groups = list(agg["meta_task"].items()) + [("IND", agg["IND"]), ("OOD", agg["OOD"]), ("overall", agg["overall"])]
    for group, value in groups:
        if value is not None:
            lines.append(f"| {group} | {agg['counts'][group]} | {100 * value:.2f} |")
    return "\n".join(lines + quantized_table(summary)) + "\n"


def quantized_table(summary: dict) -> list[str]:
    """P@1 next to bytes per vector for float and each quantisation, per dataset and over datasets."""
    per = {n: r["quantized"] for n, r in summary["datasets"].items() if "quantized" in r}
    if not per:
        return []
    modes = list(next(iter(per.values())))
    lines = ["", "| scoring | bytes/vector | " + " | ".join(per) + " | mean P@1 | ties at top |",
             "|---|---:|" + "---:|" * (len(per) + 2)]
    for mode in modes:
        accs = [per[n][mode]["acc"] for n in per]
        size = next(iter(per.values()))[mode]["bytes_per_vector"]
        ties = sum(per[n][mode]["ties_at_top"] for n in per)
        lines.append(f"| {mode} | {size} | " + " | ".join(f"{100 * a:.2f}" for a in accs)
                     + f" | {100 * sum(accs) / len(accs):.2f} | {ties} |")
    return lines
