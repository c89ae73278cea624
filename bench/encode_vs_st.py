"""embedkit's encode against ``SentenceTransformer.encode``, side by side; then cost ordering on the tiny VLMs.

    PYTHONPATH=. python bench/encode_vs_st.py --model DIR [--texts 2000 --batch 32 --runs 3] [--vlm-items 96]

``DIR`` is a sentence-transformers text checkpoint; how to get a real all-MiniLM-L6-v2 offline is in
``bench/vs_sentence_transformers.py`` (``--model random``: a random BERT of its shape, labelled).

**Text.** The same model (the ``hf_text`` backbone from ``DIR``, mean pooling, normalised; and
``SentenceTransformer(DIR)``), the same texts, the same batch size and max length (256, the
checkpoint's), eval mode, one process. The texts are real English of uneven length: the docstrings of
the Python standard library's own modules, read from its source files (no import), each whole
docstring and each of its paragraphs one text, de-duplicated, shuffled with seed 0 and cut to
``--texts``; a few words to a few hundred tokens. Each timed run encodes every text once, embedkit
(``Encoder.encode``: the inference engine, cost-ordered) and sentence-transformers alternating run by
run; the median of ``--runs`` is reported. Printed: items/s of each, the ratio of times, the largest
difference of the embeddings, and the padding share of the forward passes: embedkit's with and without
cost ordering, and sentence-transformers' (it sorts by character length; its batches, padded to their
longest, are rebuilt here with its own tokenizer).

**Tiny VLMs.** For each tiny random VLM (``--families``), an image corpus (images of many sizes, a few
with a caption) and a mixed corpus (text-only items, small and large images): items/s and padding share
of ``Encoder.encode_items`` with and without cost ordering (``sort``), interleaved, median of ``--runs``.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vs_sentence_transformers import model_folder  # noqa: E402


def stdlib_texts(n: int, seed: int = 0) -> list[str]:
    """Real English: docstrings (whole, and each paragraph) of the standard library's modules, classes
    and functions, whitespace-normalised, at least 3 words, de-duplicated, shuffled, the first ``n``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: dict[str, None] = {}
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    for piece in [doc, *doc.split("\n\n")]:
                        text = " ".join(piece.split())
                        if len(text.split()) >= 3:
                            found[text] = None
    texts = sorted(found)
    random.Random(seed).shuffle(texts)
    return texts[:n]


def st_pad_fraction(st, texts: list[str], batch: int) -> float:
    """sentence-transformers' padding share: its order (longest text in characters first), its batches,
    each padded to its longest by its own tokenizer."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    slots = real = 0
    for start in range(0, len(order), batch):
        mask = st.preprocess([texts[i] for i in order[start:start + batch]])["attention_mask"]
        slots, real = slots + mask.numel(), real + int(mask.sum())
    return 1 - real / slots


def planned_pad_fraction(costs: list[int], batch: int, sort: bool) -> float:
    """The padding share of the engine's plan (``inference.plan_batches``) from the exact costs: each
    batch padded to its longest. What the forward passes' masks give, without running the model."""
    from embedkit.inference import Batching, plan_batches

    plan = plan_batches(costs, len(costs), Batching(batch, sort=sort))
    return 1 - sum(costs) / sum(len(b) * max(costs[i] for i in b) for b in plan)


def interleaved(runs: int, sides: dict) -> dict[str, list[float]]:
    """Seconds of each side's run, ``runs`` rounds, the sides alternating within a round."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(runs):
        for name, run in sides.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


def text_side_by_side(ns) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from embedkit.config import schema
    from embedkit.data.schema import Item
    from embedkit.encoder import Encoder

    model_dir, label = model_folder(ns.model)
    cfg = schema.validate({"seed": 0, "model": {"backbone": {"name": "hf_text", "path": str(model_dir),
                                                             "max_length": 256},
                                                "pooling": {"name": "mean"}, "normalize": True}})
    encoder = Encoder.from_config(cfg["model"], seed=0).eval().to(ns.device)
    st = SentenceTransformer(str(model_dir), device=ns.device).eval()
    st.max_seq_length = 256
    texts = stdlib_texts(ns.texts)
    items = [Item(text=t) for t in texts]
    costs = encoder.processor().costs(items)
    print(f"checkpoint: {label}")
    print(f"texts: {len(texts)} docstrings and paragraphs of the Python {sys.version.split()[0]} standard library "
          f"({sysconfig.get_paths()['stdlib']}); tokens min {min(costs)}, median {int(statistics.median(costs))}, "
          f"max {max(costs)} (max length 256)")
    ek = encoder.encode(texts, batch_size=ns.batch)
    ref = st.encode(texts, batch_size=ns.batch, convert_to_tensor=True).cpu()
    print(f"max |embedding difference| embedkit vs sentence-transformers: {(ek - ref).abs().max().item():.2e}")
    pads = {sort: planned_pad_fraction(costs, ns.batch, sort) for sort in (True, False)}
    print(f"pad fraction: embedkit cost-ordered {pads[True]:.3f}, embedkit input order {pads[False]:.3f}, "
          f"sentence-transformers {st_pad_fraction(st, texts, ns.batch):.3f}")
    times = interleaved(ns.runs, {
        "embedkit": lambda: encoder.encode(texts, batch_size=ns.batch),
        "sentence-transformers": lambda: st.encode(texts, batch_size=ns.batch, convert_to_tensor=True)})
    report(times, len(texts), f"batch {ns.batch}, torch threads {torch.get_num_threads()}, {ns.device}")
    ek_t, st_t = statistics.median(times["embedkit"]), statistics.median(times["sentence-transformers"])
    print(f"ratio of times embedkit / sentence-transformers: {ek_t / st_t:.2f}x")


def report(times: dict[str, list[float]], n: int, setting: str) -> None:
    print(f"{setting}, {len(next(iter(times.values())))} interleaved runs, load {os.getloadavg()[0]:.2f}:")
    for name, secs in times.items():
        med = statistics.median(secs)
        print(f"  {name:<28} {n / med:8.1f} items/s  median {med:.2f} s  (runs {' '.join(f'{s:.2f}' for s in secs)})")


def vlm_corpora(n: int, seed: int = 0):
    """(image corpus, mixed corpus) of ``n`` items each: images of random sizes (a third with a caption);
    a third text-only (3..60 words), a third small images (28..112 px a side), a third large (224..448)."""
    import numpy as np
    from PIL import Image

    from embedkit.backbones.processors import tiny_vocabulary
    from embedkit.data.schema import Item

    rng, words = random.Random(seed), tiny_vocabulary()[:200]

    def image(lo: int, hi: int):
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)
        return Image.fromarray(np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (h, w, 3), dtype=np.uint8))

    def caption(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    images = [Item(text=caption(2, 20) if i % 3 == 0 else None, image=image(28, 448)) for i in range(n)]
    mixed = [Item(text=caption(3, 60)) if i % 3 == 0 else Item(image=image(28, 112) if i % 3 == 1 else image(224, 448))
             for i in range(n)]
    rng.shuffle(mixed)
    return images, mixed


def vlm_ordering(ns) -> None:
    import torch

    from embedkit.config.loader import compose
    from embedkit.encoder import Encoder
    from embedkit.inference import Batching, encode_in_order

    images, mixed = vlm_corpora(ns.vlm_items)
    for family in ns.families:
        cfg = compose(["recipe=demo", f"model.backbone.name={family}", "model.backbone.tiny=true"])
        encoder = Encoder.from_config(cfg["model"], seed=0).eval().to(ns.device)
        for name, items in (("images", images), ("mixed", mixed)):
            pads = {sort: encode_in_order(items, encoder, encoder.processor(), Batching(ns.vlm_batch, sort=sort))[1]
                    for sort in (True, False)}
            diff = (encoder.encode_items(items, ns.vlm_batch) - encoder.encode_items(items, ns.vlm_batch, sort=False))
            times = interleaved(ns.runs, {
                "cost-ordered": lambda enc=encoder, its=items: enc.encode_items(its, ns.vlm_batch),
                "input order": lambda enc=encoder, its=items: enc.encode_items(its, ns.vlm_batch, sort=False)})
            report(times, len(items), f"tiny {family}, {name} corpus of {len(items)}, batch {ns.vlm_batch}, "
                                      f"threads {torch.get_num_threads()}, {ns.device}")
            ratio = statistics.median(times["cost-ordered"]) / statistics.median(times["input order"])
            print(f"  pad fraction cost-ordered {pads[True].pad_fraction:.3f}, input order "
                  f"{pads[False].pad_fraction:.3f}; time ratio {ratio:.2f}x; max |difference| "
                  f"{diff.abs().max().item():.1e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="sentence-transformers checkpoint folder, or 'random' "
                                                  "(none: skip the text part)")
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="interleaved timed runs per side (median reported)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--families", nargs="*", default=["qwen2_vl", "llava_onevision"])
    ap.add_argument("--vlm-items", type=int, default=192)
    ap.add_argument("--vlm-batch", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu, cuda ... (both sides)")
    ns = ap.parse_args()

    import torch

    torch.set_num_threads(ns.threads)
    if ns.model:
        text_side_by_side(ns)
    if ns.families:
        vlm_ordering(ns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
