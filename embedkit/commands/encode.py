"""``embedkit encode``: embed a corpus file with a trained model.

    embedkit encode model=PATH input=FILE.jsonl|.parquet out=FILE.npy|.parquet
                    [batch_size=32] [instruction=NAME|TEXT] [dim=N] [part_size=1024] [device=cpu|cuda]
                    [quantize=binary|int8]

``model`` is an export folder, a run dir or a checkpoint. Rows need a ``text`` and/or ``image``
column. ``quantize=binary`` writes packed sign bits (uint8 ``[N, ceil(D/8)]``), ``quantize=int8`` int8
codes ``[N, D]`` and the per-dimension ranges beside them (``<out>.int8-ranges.npy``, ``[2, D]``: min,
max) (``embedkit/eval/quantize.py``). Parts are written as they complete; interrupted and re-run, it resumes where it stopped
(see ``embedkit/export/corpus.py``).
"""

from __future__ import annotations

from embedkit.errors import UserError

KEYS = ("model", "input", "out", "batch_size", "instruction", "dim", "part_size", "device", "quantize")
INTS = ("batch_size", "dim", "part_size")


def parse(args: list[str]) -> dict:
    opts: dict = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or key not in KEYS:
            raise UserError(f"encode: unknown argument {arg!r}; arguments: {', '.join(k + '=' for k in KEYS)}")
        if key in INTS:
            try:
                opts[key] = int(value)
            except ValueError:
                raise UserError(f"{key}: expected an integer, got {value!r}") from None
            if opts[key] < 1:
                raise UserError(f"{key}: must be >= 1, got {value}")
        else:
            opts[key] = value
    if opts.get("quantize") not in (None, "binary", "int8"):
        raise UserError(f"quantize: unknown mode {opts['quantize']!r}; choices: binary, int8")
    missing = [k for k in ("model", "input", "out") if k not in opts]
    if missing:
        raise UserError(f"encode: give {', '.join(k + '=' for k in missing)} (embedkit encode model=PATH input=FILE out=FILE)")
    return opts


def main(args: list[str]) -> int:
    opts = parse(args)
    from embedkit.export.corpus import encode_file
    from embedkit.export.reader import load

    encoder = load(opts["model"], device=opts.get("device"))
    encode_file(encoder, opts["input"], opts["out"], batch_size=opts.get("batch_size", 32),
                instruction=opts.get("instruction"), dim=opts.get("dim"), part_size=opts.get("part_size", 1024),
                quantize=opts.get("quantize"),
                model_id=opts["model"], log=lambda m: print(m, flush=True))
    return 0
