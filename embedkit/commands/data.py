"""``embedkit data mmeb``: MMEB-train (parquet or jsonl) -> per-subset WebDataset shards + a manifest.

    embedkit data mmeb --src DIR --out DIR [--images DIR] [--subsets A B] [--split original] [--cap N]

The conversion itself is ``embedkit.data.mmeb.convert``; its docstring says what it writes.
"""

from __future__ import annotations

import argparse


def parse(args: list[str]) -> argparse.Namespace:
    from embedkit.data.mmeb import SPLITS, TRAIN_YAML

    p = argparse.ArgumentParser(prog="embedkit data mmeb", description="convert MMEB-train to WebDataset shards")
    p.add_argument("what", choices=["mmeb"], help="the dataset to convert")
    p.add_argument("--src", required=True, help="MMEB-train folder (<subset>/original-*.parquet) or <subset>.parquet/.jsonl files")
    p.add_argument("--images", help="image root the *_image_path columns are relative to (default: --src)")
    p.add_argument("--out", required=True, help="output folder: <subset>/train-*.tar and manifest.json")
    p.add_argument("--subsets", nargs="+", help="subsets to convert (default: every subset found)")
    p.add_argument("--split", default="original", choices=SPLITS, help="which parquet files of the download")
    p.add_argument("--cap", type=int, default=None, help="rows per subset (default: train.yaml's cap, else 50000; 0: all)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=None, help="processes (default: the cores)")
    p.add_argument("--config", default=str(TRAIN_YAML), help="subset list with meta-tasks and caps")
    return p.parse_args(args)


def main(args: list[str]) -> int:
    try:
        ns = parse(args)
    except SystemExit as exc:  # argparse: usage errors exit 2 with its own message
        return int(exc.code or 0)
    from embedkit.data.mmeb import convert

    options = vars(ns)
    options.pop("what")
    return convert(**options)
