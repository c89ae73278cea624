"""Binary and int8 embeddings on the demo's held-out retrieval: P@1 next to bytes per vector.

    python bench/quantize.py RUN_DIR [--rescore-k 10]

RUN_DIR is a run trained on the drawn demo data (``embedkit fit``, or ``embedkit fit recipe=demo_pairs``).
Every held-out caption is ranked against every held-out image (the run's ``val/p@1`` protocol), with
the embeddings kept in float32, scalar-quantised to int8, binarised (Hamming distance), and binarised
with the top ``--rescore-k`` candidates rescored by the float query (``embedkit/eval/quantize.py``).
``ties`` counts queries whose answer shares the top score with another candidate (ties go to the
answer, as in the MMEB protocol; ``strict`` counts those as misses).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import embedkit  # noqa: E402
from embedkit.data.demo import val_examples  # noqa: E402
from embedkit.eval import quantize, retrieval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--rescore-k", type=int, default=10)
    args = ap.parse_args()
    started = time.monotonic()
    encoder = embedkit.load(args.run)
    examples = val_examples(encoder.provenance.config["data"]["demo"])
    print(f"encoding {len(examples)} held-out captions and images ...", flush=True)
    with torch.no_grad():
        q = encoder.encode_items([e.query for e in examples], 32)
        c = encoder.encode_items([e.positive for e in examples], 32)
    n, dim = len(examples), q.shape[1]
    q_index = list(range(n))
    c_index = [[r] + [j for j in range(n) if j != r] for r in range(n)]  # the answer first, as in MMEB rows
    modes = {
        "float": retrieval.row_scores(q, c, q_index, c_index),
        "int8": quantize.quantized_row_scores(q, c, q_index, c_index, "int8"),
        "binary": quantize.quantized_row_scores(q, c, q_index, c_index, "binary"),
        f"binary, top-{args.rescore_k} rescored": quantize.quantized_row_scores(
            q, c, q_index, c_index, "binary", rescore=True, rescore_k=args.rescore_k),
    }
    print(f"{n} queries x {n} candidates, D = {dim}\n")
    print("| scoring | bytes/vector | P@1 | ties | strict P@1 |\n|---|---:|---:|---:|---:|")
    for name, scores in modes.items():
        hits, ties = retrieval.hits_at_1(scores), retrieval.top_ties(scores)
        size = quantize.bytes_per_vector(name.split(",")[0], dim)
        print(f"| {name} | {size} | {hits.float().mean():.3f} | {int(ties.sum())} | "
              f"{(hits & ~ties).float().mean():.3f} |")
    print(f"\n({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
