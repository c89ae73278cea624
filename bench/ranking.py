"""How long the graded ranking metrics take on a corpus-sized score matrix (``eval/ranking.py``).

    PYTHONPATH=. python bench/ranking.py [--queries 1000 --corpus 10000 --runs 3]

For 1, 5 and 50 judged candidates per query (grades 1-3, seeded), ``ranking_report`` (NDCG@1/5/10
linear and exponential, hit@k, recall@k, MRR) over a random ``[queries, corpus]`` score matrix; the
median of ``--runs`` seconds is printed with the judged pairs per second. Target (ranking.py's
docstring): 1k queries x 10k candidates in about a second on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from embedkit.eval import ranking


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--corpus", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    scores = torch.randn(args.queries, args.corpus, generator=torch.Generator().manual_seed(1))
    for per_query in (1, 5, 50):
        rng = random.Random(1)
        qrels = [{c: rng.randint(1, 3) for c in rng.sample(range(args.corpus), per_query)}
                 for _ in range(args.queries)]
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            ranking.ranking_report(scores, qrels, ks=(1, 5, 10))
            times.append(time.perf_counter() - start)
        took = statistics.median(times)
        print(f"{args.queries} queries x {args.corpus} candidates, {per_query} judged per query: "
              f"{took:.2f} s ({args.queries * per_query / took:,.0f} judged pairs/s)")


if __name__ == "__main__":
    main()
