"""``embedkit data mmeb``: MMEB-train (parquet or jsonl) -> per-subset WebDataset shards + a manifest.

    embedkit data mmeb src=DIR out=DIR [images=DIR] [subsets=[A,B]] [split=original] [cap=N]
                       [shard_size=N] [workers=N] [config=FILE]

``embedkit data mmeb-v2``: the VLM2Vec-V2 training mixture (MMEB-train images, colpali, VisRAG,
LLaVA-Hound video caption and QA, with frames) -> per-source shards + one manifest
(``embedkit.data.mmeb_v2.convert``; the source layout: docs/mmeb-v2-data.md).

    embedkit data mmeb-v2 src=DIR out=DIR [images=DIR] [subsets=[A,B]] [cap=N] [num_frames=8]
                          [shard_size=N] [workers=N] [config=FILE]

The old spelling (``--src DIR --out DIR --subsets A B --shard-size N`` ...) still works for a release,
with one deprecation line on stderr. The conversion itself is ``embedkit.data.mmeb.convert``; its
docstring says what it writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from embedkit.commands._options import Verb, option
from embedkit.errors import UserError


@dataclass
class MmebOptions:
    dataset: Literal["mmeb", "mmeb-v2"] = option(help="the dataset to convert: mmeb (MMEB-train) or mmeb-v2 (the "
                                                  "V2 training mixture)", positional=True, key="dataset",
                                                  metavar="mmeb|mmeb-v2")
    src: str = option(help="MMEB-train folder (<subset>/original-*.parquet) or <subset>.parquet/.jsonl files; "
                      "mmeb-v2: the download root (docs/mmeb-v2-data.md)", metavar="DIR")
    out: str = option(help="output folder: <subset>/train-*.tar shards and the shard set's manifest", metavar="DIR")
    images: Optional[str] = option(None, "image root the *_image_path columns are relative to; null: src "
                                   "(mmeb-v2: src/MMEB-train)", metavar="DIR")
    subsets: Optional[list[str]] = option(None, "subsets (mmeb-v2: sources) to convert; null: every one")
    split: Literal["original", "diverse_instruction", "train"] = option("original",
                                                                      "which parquet files of the download (mmeb)")
    cap: Optional[int] = option(None, "rows per subset; null: the config's cap (mmeb: else 50000); 0: all", minimum=0)
    shard_size: int = option(1000, "samples per shard", minimum=1)
    workers: Optional[int] = option(None, "processes; null: the cores", minimum=1)
    config: Optional[str] = option(None, "subset list with meta-tasks and caps; null: the shipped train.yaml "
                                   "(mmeb-v2: train_v2.yaml)", metavar="FILE")
    num_frames: Optional[int] = option(None, "mmeb-v2: frames kept per video, uniform by index; null: 8; 0: all",
                                       minimum=0)


VERB = Verb("data", "convert MMEB-train or the MMEB-V2 training mixture to WebDataset shards", MmebOptions,
            dash_flags="deprecated")


def main(args: list[str]) -> int:
    opts = VERB.parse(args)
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k != "dataset"}
    if options["config"] is None:
        options.pop("config")  # convert's default: the shipped train.yaml / train_v2.yaml
    if opts.dataset == "mmeb-v2":
        return _mmeb_v2(options)
    if options.pop("num_frames") is not None:
        raise UserError("num_frames: only data mmeb-v2 has videos")
    from embedkit.data.mmeb import convert

    return convert(**options)


def _mmeb_v2(options: dict) -> int:
    if options.pop("split") != "original":
        raise UserError("split: data mmeb-v2 reads the original split (VLM2Vec's train_alltasks.yaml)")
    if options["num_frames"] is None:
        options["num_frames"] = 8  # mmeb-v2.md sec. 4: num_frames 8 in train_alltasks.yaml
    from embedkit.data.mmeb_v2 import convert

    return convert(**options)
