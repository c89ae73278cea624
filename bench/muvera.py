"""MUVERA: time to score a multi-vector corpus by FDE inner products vs exact MaxSim, and the recall.

    python bench/muvera.py                                    # 3000 documents, the FDEConfig defaults
    python bench/muvera.py --docs 10000 --k-sim 5 --d-proj 16 --repetitions 20 --threads 2

A synthetic corpus (``bench/muvera_corpus.clustered_corpus``: documents of 8-24 tokens drawn around
cluster centres). Timed, for all queries against the whole corpus: ``fde`` = the query FDEs and their
inner products with the precomputed document FDEs; ``exact`` = MaxSim against every document's tokens;
``fde+rerank`` = FDE candidates then exact MaxSim on ``--candidates`` of them. The document FDEs are
built once (indexing; reported apart). Prints recall@candidates of the exact top 10 and the ratios.

``--mmeb-rows N`` also times the ``embedkit eval`` layout (``data.eval.retrieval=muvera``): N rows, each
query against its own list of ``--row-candidates`` documents whose first is the query's exact MaxSim
best; ``retrieval.row_scores`` (exact) against ``muvera.muvera_row_scores`` (FDEs of every distinct
set, then exact MaxSim on each row's ``--candidates`` best), with the P@1 of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.muvera_corpus import clustered_corpus, recall_of_exact_top  # noqa: E402
from embedkit.eval.muvera import FDEConfig, MuveraIndex, MuveraRetrieval, maxsim, muvera_row_scores  # noqa: E402
from embedkit.eval.retrieval import precision_at_1, row_scores  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--k-sim", type=int, default=FDEConfig.k_sim)
    ap.add_argument("--d-proj", type=int, default=FDEConfig.d_proj)
    ap.add_argument("--repetitions", type=int, default=FDEConfig.repetitions)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--mmeb-rows", type=int, default=0, help="also time the eval's row layout on this many queries")
    ap.add_argument("--row-candidates", type=int, default=1000, help="candidates per row (MMEB retrieval: 1000)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    docs, dm, q, qm = clustered_corpus(num_docs=args.docs, num_queries=args.queries, dim=args.dim)
    config = FDEConfig(k_sim=args.k_sim, d_proj=args.d_proj, repetitions=args.repetitions)
    print(f"corpus: {args.docs} documents x {docs.shape[1]} tokens max, {args.queries} queries x {q.shape[1]} "
          f"tokens, d={args.dim}; FDE k_sim={config.k_sim} d_proj={config.d_proj} R={config.repetitions}", flush=True)
    start = time.perf_counter()
    index = MuveraIndex(docs, dm, config)
    build = time.perf_counter() - start
    print(f"indexing (document FDEs, {index.fde.width} numbers each): {build:.2f}s", flush=True)
    fde = best_of(lambda: (index.fde.queries(q, qm) @ index.doc_fde.T).topk(args.candidates, dim=1), args.repeats)
    exact = best_of(lambda: maxsim(q, qm, docs, dm).topk(10, dim=1), args.repeats)
    rerank = best_of(lambda: index.search(q, qm, k=10, candidates=args.candidates), args.repeats)
    recall = recall_of_exact_top(index, q, qm, k=10, candidates=args.candidates)
    print(f"\n| scoring | seconds for {args.queries} queries | vs exact |\n|---|---:|---:|")
    for name, t in (("exact MaxSim", exact), ("FDE", fde), (f"FDE + MaxSim re-rank of {args.candidates}", rerank)):
        print(f"| {name} | {t:.4f} | {exact / t:.1f}x faster |" if name != "exact MaxSim" else f"| {name} | {t:.4f} | 1.0x |")
    print(f"\nrecall@{args.candidates} of the exact MaxSim top 10: {recall:.3f}")
    print(f"ratio exact / FDE scoring time: {exact / fde:.1f}")
    if args.mmeb_rows:
        mmeb_rows(args, config, q, docs)


def mmeb_rows(args, config: FDEConfig, q: torch.Tensor, docs: torch.Tensor) -> None:
    """The eval's layout: each query against its own candidate list, answer (the exact best) first."""
    rows = min(args.mmeb_rows, len(q))
    best = maxsim(q[:rows], None, docs, docs.norm(dim=-1) > 0).argmax(dim=1).tolist()
    g = torch.Generator().manual_seed(1)
    lists = []
    for r in range(rows):
        others = [j for j in torch.randperm(len(docs), generator=g)[: args.row_candidates].tolist() if j != best[r]]
        lists.append([best[r]] + others[: args.row_candidates - 1])
    qi = list(range(rows))
    settings = MuveraRetrieval(config, args.candidates)
    exact = best_of(lambda: row_scores(q, docs, qi, lists), args.repeats)
    muvera = best_of(lambda: muvera_row_scores(q, docs, qi, lists, settings), args.repeats)
    s_exact, (s_mu, info) = row_scores(q, docs, qi, lists), muvera_row_scores(q, docs, qi, lists, settings)
    print(f"\neval layout: {rows} rows x {len(lists[0])} candidates (from {len(docs)} distinct documents), "
          f"FDE {info['fde_bytes']} B per set vs {info['token_set_bytes']:.0f} B of real tokens")
    print("| scoring | seconds | P@1 |\n|---|---:|---:|")
    print(f"| exact MaxSim (row_scores) | {exact:.3f} | {precision_at_1(s_exact)['acc']:.3f} |")
    print(f"| MUVERA, best {args.candidates} re-ranked (muvera_row_scores) | {muvera:.3f} | "
          f"{precision_at_1(s_mu)['acc']:.3f} |")


if __name__ == "__main__":
    main()
