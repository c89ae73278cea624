"""Embedding a corpus file, resumably: ``encode_file(encoder, input, out)``.

Input: JSONL (one object a line) or parquet, with a ``text`` and/or an ``image`` column (an image is
a path, relative to the input file's folder, or encoded bytes; parquet image structs with ``bytes``
or ``path`` are read too), or ``images`` (a list of such images, in the order of the text's
``<|image_k|>``) or ``video`` (a video file's path, relative likewise, or its bytes: sampled by the
model's frame policy, ``Encoder.decoding``). A missing or undecodable file is one line naming its row. Output: ``.npy`` (float32 [N, D]) or ``.parquet`` (an ``embedding`` list
column). Rows are encoded in parts of ``part_size`` rows, each written atomically into
``<out>.parts/`` as it completes; an interrupted run re-run with the same arguments skips the parts
already there, and the final file is written atomically from the parts (identical to an
uninterrupted run's), then the parts are removed. Each part goes through the inference engine
(``Encoder.encode_items``: cost-ordered within the part, ``batch_tokens``, ``num_workers``) as
``RowItems``: the costs read each image's size from its header, and an image is decoded when its batch
is processed (in the loader workers with ``num_workers``), so no part is held decoded.

Under ``torchrun`` (a process group) the parts are dealt round-robin over the ranks, each encoded once;
rank 0 writes the final file, in input order, when every rank is done (the same bytes as one process).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from embedkit.distributed.ranks import barrier, rank_and_world
from embedkit.errors import UserError
from embedkit.fault_points import fault_point
from embedkit.files import atomic_path, is_disk_full, write_atomic
from embedkit.rows import RowItems, read_rows

OUTPUTS = (".npy", ".parquet")


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def encode_file(encoder, input_path, out_path, *, batch_size: int = 32, instruction: str | None = None,
                dim: int | None = None, part_size: int = 1024, model_id: str = "",
                log: Callable[[str], None] = print, quantize: str | None = None, batch_tokens: int = 0,
                num_workers: int = 0, side: str | None = None) -> Path:
    """``input_path``'s rows embedded to ``out_path`` in resumable parts (module docstring). ``side``: the rows'
    side of a pair (``"candidate"``: documents, for a model that frames the sides apart, GME's and
    Qwen3-VL-Embedding's system messages; None: as queries)."""
    input_path, out = Path(input_path).expanduser(), Path(out_path).expanduser()
    if out.suffix not in OUTPUTS:
        raise UserError(f"out: {out} must end in {' or '.join(OUTPUTS)}")
    rows = read_rows(input_path)
    if not rows:
        raise UserError(f"input: {input_path} has no rows")
    if not any(k in r for r in rows[:1] for k in ("text", "image", "images", "video")):
        raise UserError(f"input: {input_path} needs a text, image, images or video column; has {sorted(rows[0])}")
    stat = input_path.stat()
    key = fingerprint(input_path.resolve(), stat.st_size, stat.st_mtime_ns, model_id, instruction, dim, part_size,
                      *([side] if side else []))  # (no side: the key of earlier runs, whose parts stay reusable)
    parts_dir = out.with_name(out.name + ".parts")
    rank, world = rank_and_world()
    if rank == 0:
        open_parts(parts_dir, key, len(rows))
    barrier()
    root = input_path.parent
    starts = range(0, len(rows), part_size)
    done = sum((parts_dir / f"part-{s:09d}.npy").is_file() for s in starts)
    if done:
        log(f"encode: resuming, {done} of {len(starts)} parts already written")
    prefix = encoder.instruction_prefix(instruction) if instruction else None  # (no instruction: any encoder)
    began, encoded = time.monotonic(), 0
    for index, start in enumerate(starts):
        part = parts_dir / f"part-{start:09d}.npy"
        if part.is_file() or index % world != rank:  # written, or another rank's part
            continue
        chunk = rows[start : start + part_size]
        decoding = getattr(encoder, "decoding", None)  # an Encoder's frame policy and image cap
        items = RowItems(chunk, root, prefix, getattr(decoding, "policy", None), first=start,
                         max_pixels=getattr(decoding, "max_image_pixels", None))
        emb = encoder.encode_items(items, batch_size, dim=dim, batch_tokens=batch_tokens,
                                   num_workers=num_workers, **({"side": side} if side else {}))
        write_part(part, emb.numpy().astype(np.float32))
        encoded += len(chunk)
        rate = encoded / max(time.monotonic() - began, 1e-9)
        log(f"encode: {min(start + part_size, len(rows))}/{len(rows)} rows ({rate:.1f} rows/s)")
    barrier()  # every rank's parts written
    if rank != 0:
        return out
    emb = np.concatenate([np.load(parts_dir / f"part-{s:09d}.npy") for s in starts])
    if quantize:  # the parts stay float (resumable whatever the mode); the final file holds the codes
        emb = quantized(emb, quantize, out)
    write_output(out, emb)
    shutil.rmtree(parts_dir)
    log(f"encode: wrote {out} ({emb.shape[0]} x {emb.shape[1]}{' ' + str(emb.dtype) if quantize else ''})")
    return out


def write_output(out: Path, emb: np.ndarray) -> None:
    """``emb`` written atomically to ``out``: ``.npy``, or ``.parquet`` with an ``embedding`` list column."""
    with atomic_path(out) as tmp:
        if out.suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, emb)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"embedding": list(emb)}), tmp)


def open_parts(parts_dir: Path, key: str, rows: int) -> None:
    """The parts folder of a run with fingerprint ``key``: kept when it holds this run's parts, else
    emptied (parts of another input, model or setting: start over); its stamp written."""
    stamp = parts_dir / "run.json"
    if parts_dir.is_dir() and (not stamp.is_file() or json.loads(stamp.read_text()).get("key") != key):
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(stamp, json.dumps({"key": key, "rows": rows}))


def write_part(part: Path, emb: np.ndarray) -> None:
    """One part, atomically; a full disk is one line (the parts before it stay: a re-run resumes)."""
    try:
        with atomic_path(part) as tmp, open(tmp, "wb") as f:
            np.save(f, emb)
            fault_point("encode_part")
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise UserError(f"disk full writing {part}; the parts written before it are kept; free space and run "
                        "the same command again to resume") from None


def quantized(emb: np.ndarray, mode: str, out: Path) -> np.ndarray:
    """Binary: packed sign bits. int8: codes, with the per-dimension ranges written to
    ``<out>.int8-ranges.npy`` (needed to dequantise; calibrated on this corpus)."""
    import torch

    from embedkit.eval import quantize

    x = torch.from_numpy(emb)
    if mode == "binary":
        return quantize.binarize(x).numpy()
    ranges = quantize.int8_ranges(x)
    with atomic_path(out.with_name(out.name + ".int8-ranges.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, ranges.numpy().astype(np.float32))
    return quantize.int8_quantize(x, ranges).numpy()
