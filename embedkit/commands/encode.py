"""``embedkit encode``: embed a corpus file with a trained model.

    embedkit encode model=PATH input=FILE.jsonl|.parquet out=FILE.npy|.parquet
                    [batch_size=32] [instruction=NAME|TEXT] [dim=N] [part_size=1024] [device=cpu|cuda]

``model`` is an export folder, a run dir or a checkpoint. Rows need a ``text`` and/or ``image``
column. Parts are written as they complete; interrupted and re-run, it resumes where it stopped
(see ``embedkit/export/corpus.py``).
"""

from __future__ import annotations

from embedkit.errors import UserError

KEYS = ("model", "input", "out", "batch_size", "instruction", "dim", "part_size", "device")
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
                model_id=opts["model"], log=lambda m: print(m, flush=True))
    return 0
