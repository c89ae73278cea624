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

from dataclasses import dataclass
from typing import Literal, Optional

from embedkit.commands._options import Verb, option


@dataclass
class ExportOptions:
    source: str = option(help="the run dir (its last checkpoint) or checkpoint to export", positional=True,
                         metavar="RUN_DIR|CKPT")
    out: str = option(help="the model folder to write", metavar="DIR")
    merge_lora: bool = option(True, "merge the LoRA/DoRA adapter into the backbone's weights")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = option(None, "weights' dtype; null: as trained")
    prompts: dict[str, str] = option({}, "an instruction the folder's model uses by that name (repeatable)",
                                     prefix="prompt")
    overwrite: bool = option(False, "replace an existing folder at out")
    layer: Optional[int] = option(None, "cut the model to its first L layers (2D Matryoshka); null: all",
                                  minimum=1, metavar="L")
    dim: Optional[int] = option(None, "keep the first D embedding dimensions (Matryoshka); null: all",
                                minimum=1, metavar="D")
    trust_checkpoint: bool = option(False, "read a checkpoint you trust with the full unpickler (it may run code "
                                           "from the file); default: weights and embedkit's own states only")


VERB = Verb("export", "a run as a self-contained model folder", ExportOptions)


def main(args: list[str]) -> int:
    opts = VERB.parse(args)
    from embedkit.export.writer import export_model

    export_model(opts.source, opts.out, merge_lora=opts.merge_lora, dtype=opts.dtype,
                 prompts=opts.prompts, overwrite=opts.overwrite, layer=opts.layer, dim=opts.dim,
                 trust_checkpoint=opts.trust_checkpoint,
                 log=lambda m: print(m, flush=True))
    return 0
