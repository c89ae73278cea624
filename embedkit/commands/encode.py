"""``embedkit encode``: embed a corpus file with a trained model.

    embedkit encode model=PATH input=FILE.jsonl|.parquet out=FILE.npy|.parquet
                    [batch_size=32] [batch_tokens=0] [num_workers=0] [instruction=NAME|TEXT] [dim=N]
                    [part_size=1024] [device=cpu|cuda] [dtype=float32|bfloat16|float16] [quantize=binary|int8]
                    [side=query|candidate]

``model`` is an export folder, a run dir or a checkpoint. Rows need a ``text`` and/or ``image``
column, or ``images`` (a list of paths, in the order of the text's ``<|image_k|>``) or ``video`` (a
path, sampled by the model's frame policy); paths are relative to the input file. ``quantize=binary`` writes packed sign bits (uint8 ``[N, ceil(D/8)]``), ``quantize=int8`` int8
codes ``[N, D]`` and the per-dimension ranges beside them (``<out>.int8-ranges.npy``, ``[2, D]``: min,
max) (``embedkit/eval/quantize.py``). Parts are written as they complete; interrupted and re-run, it resumes where it stopped
(see ``embedkit/export/corpus.py``). Rows are ordered by token cost within a part and cut into forward
passes of ``batch_size`` items and at most ``batch_tokens`` padded tokens (``embedkit/inference.py``).
Under ``torchrun --nproc_per_node N -m embedkit encode ...`` the parts are split across the N processes
(each on its own GPU when there are GPUs) and rank 0 writes the file; the bytes are those of one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from embedkit.commands._options import Verb, option


@dataclass
class EncodeOptions:
    model: str = option(help="an export folder, a run dir or a checkpoint", metavar="PATH")
    input: str = option(help="the corpus: rows with text and/or image, images or video columns", metavar="FILE.jsonl|.parquet")
    out: str = option(help="the embeddings to write", metavar="FILE.npy|.parquet")
    batch_size: int = option(32, "items per forward pass", minimum=1)
    batch_tokens: int = option(0, "padded tokens per forward pass (items x the longest); 0: no budget", minimum=0)
    num_workers: int = option(0, "loader processes that tokenise and process images ahead of the model; "
                                 "0: in this process", minimum=0)
    instruction: Optional[str] = option(None, "a prompt name of the model, or the instruction text itself",
                                        metavar="NAME|TEXT")
    dim: Optional[int] = option(None, "keep the first N dimensions (Matryoshka); null: all", minimum=1)
    part_size: int = option(1024, "rows per part written (an interrupted run resumes from its parts)", minimum=1)
    device: Optional[str] = option(None, "cpu, cuda, cuda:1 ...; null: the CPU", metavar="DEVICE")
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = option(None, "run the model in this dtype; "
                                                                        "null: as stored")
    quantize: Optional[Literal["binary", "int8"]] = option(None, "write packed sign bits or int8 codes")
    side: Optional[Literal["query", "candidate"]] = option(None, "the rows' side, for a model that frames queries "
                                                           "and documents apart (GME, Qwen3-VL-Embedding: a "
                                                           "corpus is candidate); null: as queries")
    trust_checkpoint: bool = option(False, "read a checkpoint you trust with the full unpickler (it may run code "
                                           "from the file); default: weights and embedkit's own states only")


VERB = Verb("encode", "embed a corpus file with a trained model", EncodeOptions)


def main(args: list[str]) -> int:
    opts = VERB.parse(args)
    from embedkit.distributed.ranks import join_launched_group, leave_group, rank_logger
    from embedkit.export.corpus import encode_file
    from embedkit.export.reader import load

    joined = join_launched_group()
    encoder = load(opts.model, device=opts.device, dtype=opts.dtype, trust_checkpoint=opts.trust_checkpoint)
    encode_file(encoder, opts.input, opts.out, batch_size=opts.batch_size,
                instruction=opts.instruction, dim=opts.dim, part_size=opts.part_size,
                quantize=opts.quantize, batch_tokens=opts.batch_tokens, num_workers=opts.num_workers, side=opts.side,
                model_id=f"{opts.model} {opts.dtype or ''}",  # parts of another model or dtype are not reused
                log=rank_logger())
    if joined:
        leave_group()
    return 0
