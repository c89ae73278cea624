"""Exact duplicates inside B3 batches against random batches: for each example of a batch, how many other
examples of the batch carry the same query + positive text (on the demo data: the same caption, another
drawn image -- a false negative the text-to-image side cannot mask). Reads a run's ``b3_partition.json``
and its training shards.

    python bench/b3_duplicates.py RUN_DIR 'SHARDS_GLOB' [--batch 16] [--seed 0] [--homogeneous]

The figures in README ("B3 batch mining") came from it on bench/b3_demo.sh's run b3-0.
"""

from __future__ import annotations

import argparse
import glob

import numpy as np

from embedkit.data.b3 import B3Partition, B3Plan, ExampleIndex
from embedkit.data.reader import take
from embedkit.data.shard_set import ShardSet
from embedkit.runs import RunDir


def companions(batches, keys: np.ndarray) -> float:
    """Mean, over the examples of all batches, of the other examples in its batch with its key."""
    return float(np.mean([np.mean([(keys[b] == keys[i]).sum() - 1 for i in b]) for b in batches]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("shards")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--homogeneous", action="store_true", help="one subset per batch (task_batch_size > 0)")
    args = ap.parse_args()
    index = ExampleIndex(ShardSet(sorted(glob.glob(args.shards))))
    keys = []
    for i in range(len(index)):
        example = take(*index.read(i))[0]
        keys.append(f"{example.query.text}|{example.positive.text}" if example else f"unreadable-{i}")
    keys = np.array(keys)
    plan = B3Plan(B3Partition.load(RunDir(args.run).b3_partition_path), args.seed, args.batch,
                  homogeneous=args.homogeneous)
    b3 = [plan.global_indices(s) for s in range(plan.steps_per_epoch)]
    source, rng, random = index.source_of(), np.random.default_rng(args.seed), []
    groups = [np.flatnonzero(source == s) for s in np.unique(source)] if args.homogeneous else [np.arange(len(keys))]
    for members in groups:
        order = rng.permutation(members)
        random += [order[k:k + args.batch] for k in range(0, len(order) - args.batch + 1, args.batch)]
    print(f"{len(keys)} examples, {len(set(keys))} distinct texts; same-text companions per example in a batch "
          f"of {args.batch}: B3 {companions(b3, keys):.2f}, random {companions(random, keys):.2f}")


if __name__ == "__main__":
    main()
