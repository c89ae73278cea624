"""``embedkit export``: a run dir or checkpoint -> a self-contained model folder.

    embedkit export RUN_DIR|CKPT out=DIR [merge_lora=true] [dtype=float32|bfloat16|float16]
                    [prompt.NAME=TEXT ...] [overwrite=false] [layer=L] [dim=D]

The folder holds the backbone (LoRA/DoRA merged unless ``merge_lora=false``) as safetensors with its
tokenizer/processor files, ``embedkit.json`` for ``embedkit.load``, the sentence-transformers files
and a model card; see ``embedkit/export/__init__.py``. A run whose LoRA adapter is still zero is
refused (exit 2). ``layer=``/``dim=`` export the model cut to its first L layers (the rest not
written) and D dimensions (2D Matryoshka / Starbucks; ``embedkit.load`` reproduces the cut).
"""

from __future__ import annotations

from embedkit.errors import UserError

USAGE = ("export: usage: embedkit export RUN_DIR|CKPT out=DIR [merge_lora=true] [dtype=...] [prompt.NAME=TEXT] "
         "[layer=L] [dim=D]")


def parse_bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise UserError(f"{key}: expected true or false, got {value!r}")


def parse_positive_int(key: str, value: str) -> int:
    """``layer=``/``dim=`` words (export and eval): a positive integer, or a one-line error."""
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"{key}: expected a positive integer, got {value!r}") from None
    if number < 1:
        raise UserError(f"{key}: must be >= 1, got {number}")
    return number


def parse(args: list[str]) -> dict:
    opts: dict = {"source": None, "prompts": {}, "merge_lora": True, "dtype": None, "overwrite": False,
                  "layer": None, "dim": None}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            if opts["source"] is not None:
                raise UserError(USAGE)
            opts["source"] = arg
        elif key.startswith("prompt."):
            opts["prompts"][key[len("prompt."):]] = value
        elif key in ("merge_lora", "overwrite"):
            opts[key] = parse_bool(key, value)
        elif key in ("out", "dtype"):
            opts[key] = value
        elif key in ("layer", "dim"):
            opts[key] = parse_positive_int(key, value)
        else:
            raise UserError(f"export: unknown option {key!r}; options: out, merge_lora, dtype, prompt.NAME, "
                            "overwrite, layer, dim")
    if opts["source"] is None or not opts.get("out"):
        raise UserError(USAGE)
    return opts


def main(args: list[str]) -> int:
    opts = parse(args)
    from embedkit.export.writer import export_model

    export_model(opts["source"], opts["out"], merge_lora=opts["merge_lora"], dtype=opts["dtype"],
                 prompts=opts["prompts"], overwrite=opts["overwrite"], layer=opts["layer"], dim=opts["dim"],
                 log=lambda m: print(m, flush=True))
    return 0
