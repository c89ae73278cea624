"""``embedkit data mmeb``: MMEB-train (parquet or jsonl) -> per-subset WebDataset shards + a manifest.

    embedkit data mmeb src=DIR out=DIR [images=DIR] [subsets=[A,B]] [split=original] [cap=N]
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


@dataclass
class MmebOptions:
    dataset: Literal["mmeb"] = option(help="the dataset to convert", positional=True, key="dataset", metavar="mmeb")
    src: str = option(help="MMEB-train folder (<subset>/original-*.parquet) or <subset>.parquet/.jsonl files",
                      metavar="DIR")
    out: str = option(help="output folder: <subset>/train-*.tar shards and the shard set's manifest", metavar="DIR")
    images: Optional[str] = option(None, "image root the *_image_path columns are relative to; null: src",
                                   metavar="DIR")
    subsets: Optional[list[str]] = option(None, "subsets to convert; null: every subset found")
    split: Literal["original", "diverse_instruction", "train"] = option("original",
                                                                      "which parquet files of the download")
    cap: Optional[int] = option(None, "rows per subset; null: train.yaml's cap, else 50000; 0: all", minimum=0)
    shard_size: int = option(1000, "samples per shard", minimum=1)
    workers: Optional[int] = option(None, "processes; null: the cores", minimum=1)
    config: Optional[str] = option(None, "subset list with meta-tasks and caps; null: the shipped train.yaml",
                                   metavar="FILE")


VERB = Verb("data", "convert MMEB-train to WebDataset shards", MmebOptions, dash_flags="deprecated")


def main(args: list[str]) -> int:
    opts = VERB.parse(args)
    from embedkit.data.mmeb import convert

    options = {k: v for k, v in dataclasses.asdict(opts).items() if k != "dataset"}
    if options["config"] is None:
        options.pop("config")  # convert's default: the shipped train.yaml
    return convert(**options)
