"""A model cut to a depth (``Encoder.cut``, ``embedkit.load(path, layer=, dim=)``): parameters, time, P@1.

    python bench/depth.py [--layers 8] [--hidden 128] [--items 64]     # a tiny random Qwen2-VL
    python bench/depth.py --run RUN_DIR [--dims 16 64]                  # a run trained on the demo data

Without ``--run``: a tiny random Qwen2-VL (``--layers`` language-model layers, ``--hidden`` wide) encodes
``--items`` captions at full depth and cut to each depth; it prints the language model's parameters
kept, the best-of-7 encode time as a ratio to the full model's (measured in turn), and the largest difference to the full
model's ``encode(layer=)`` (0: the cut is exact). With ``--run``: every held-out caption of the demo
run ranked against every held-out image (the run's ``val/p@1`` protocol) at each (layer, dim), e.g. a
``loss=matryoshka_2d`` run's sub-models against a plain run's layers.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedkit.config.loader import compose  # noqa: E402
from embedkit.data.schema import Item  # noqa: E402
from embedkit.encoder import Encoder  # noqa: E402


def time_ratio(cut: Encoder, full: Encoder, items: list[Item], repeats: int = 7) -> float:
    """Best-of-``repeats`` encode time of ``cut`` over ``full``'s, the two measured in turn (a busy
    machine slows both alike)."""
    best = {"cut": float("inf"), "full": float("inf")}
    for _ in range(repeats):
        for name, encoder in (("full", full), ("cut", cut)):
            start = time.perf_counter()
            encoder.encode_items(items, batch_size=len(items))
            best[name] = min(best[name], time.perf_counter() - start)
    return best["cut"] / best["full"]


def lm_params(encoder: Encoder) -> int:
    vision = tuple(encoder.backbone.vision_prefixes)
    return sum(p.numel() for n, p in encoder.backbone.named_parameters() if not n.startswith(vision))


def tiny(args) -> None:
    cfg = compose(["recipe=demo", f"model.backbone.tiny_layers={args.layers}",
                   f"model.backbone.tiny_hidden_size={args.hidden}"])
    encoder = Encoder.from_config(cfg["model"], seed=0).eval()
    items = [Item(text="a red circle at the top left of a blue square " * 6)] * args.items
    full_n = lm_params(encoder)
    print(f"tiny Qwen2-VL, {args.layers} layers, hidden {args.hidden}, {args.items} captions of "
          f"{encoder.processor()(items[:1])['input_ids'].shape[1]} tokens\n")
    print("| layer | LM parameters | share | encode time vs full | max diff to encode(layer=) |\n|---:|---:|---:|---:|---:|")
    for layer in sorted({args.layers, args.layers // 2, 2, 1}, reverse=True):
        cut = copy.deepcopy(encoder).cut(layer=layer)
        diff = (cut.encode_items(items[:4]) - encoder.encode_items(items[:4], layer=layer)).abs().max().item()
        print(f"| {layer} | {lm_params(cut):,} | {lm_params(cut) / full_n:.2f} | "
              f"{time_ratio(cut, encoder, items):.2f}x | {diff:.1e} |")


def held_out(args) -> None:
    import embedkit
    from embedkit.data.demo import val_examples
    from embedkit.eval import retrieval

    full = embedkit.load(args.run)
    trained = full.provenance
    examples = val_examples(trained.config["data"]["demo"])
    n = len(examples)
    q_index, c_index = list(range(n)), [[r] + [j for j in range(n) if j != r] for r in range(n)]
    depth, dims = full.backbone.num_layers, args.dims or [full.embedding_dim]
    print(f"{args.run}: {n} held-out captions x {n} images (loss {trained.config['loss']['name']})\n")
    print("| layer | dim | trained pair | P@1 |\n|---:|---:|---|---:|")
    for layer in range(depth, 0, -1):
        for dim in dims:
            with warnings.catch_warnings():  # an untrained pair is marked in the table instead
                warnings.simplefilter("ignore")
                encoder = embedkit.load(args.run, layer=layer, dim=dim)
            answer = ("-" if not trained.dims  # not Matryoshka-trained
                      else "yes" if (layer, dim) in (trained.pairs or [(layer, d) for d in trained.dims])
                      else "no")
            q = encoder.encode_items([e.query for e in examples], 32)
            c = encoder.encode_items([e.positive for e in examples], 32)
            p1 = retrieval.hits_at_1(retrieval.row_scores(q, c, q_index, c_index)).float().mean()
            print(f"| {layer} | {dim} | {answer} | {p1:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--run", type=Path)
    ap.add_argument("--dims", type=int, nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)  # steadier ratios on a shared machine
    with torch.no_grad():
        held_out(args) if args.run else tiny(args)


if __name__ == "__main__":
    main()
