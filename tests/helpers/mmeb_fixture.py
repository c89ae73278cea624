"""A tiny MMEB-eval-format folder and fake encoders (shared by tests/eval/test_eval.py and its DDP script).

Two datasets from the manifest, 10 candidates per row, candidate 0 the answer:

- ``N24News`` (Classification, IND): query = an 8x8 image of class k's colour + a question; the
  candidates are the texts ``class j``. Rows reuse queries (so de-duplication has work to do).
- ``RefCOCO`` (Grounding, OOD): query = the text ``object k``; the candidates are images of
  the colours, stored in a ``.jsonl`` file (the other dataset is parquet).

Every item carries its class (an image's colour, the number in a text), so ``perfect_encoder``
maps a query and its answer to the same one-hot vector and no other candidate to it.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

PALETTE = [(20 * k + 10, 255 - 20 * k, (97 * k) % 256) for k in range(10)]
ROWS = 60
NUM_CLASSES = 10


def _image(path: Path, k: int, tag: int) -> None:
    from PIL import Image

    img = Image.new("RGB", (8, 8), PALETTE[k])
    img.putpixel((0, 0), (tag % 256, tag // 256, 0))  # distinct files, same class colour
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def build(root: Path, rows: int = ROWS) -> dict:
    """Write the two datasets under ``root``; returns the answer class of every row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)
    answers: dict[str, list[int]] = {"N24News": [], "RefCOCO": []}
    # N24News: image+text query -> text label; queries repeat every 40 rows
    recs = []
    for r in range(rows):
        q = r % 40
        k = q % NUM_CLASSES
        _image(root / "images" / "N24News" / f"q{q}.png", k, q)
        others = [j for j in range(NUM_CLASSES) if j != k]
        rng.shuffle(others)
        labels = [k] + others
        recs.append(
            {
                "qry_text": "<|image_1|>\nWhich class is this news image from?",
                "qry_img_path": f"N24News/q{q}.png",
                "tgt_text": [f"class {j}" for j in labels],
                "tgt_img_path": [""] * NUM_CLASSES,
            }
        )
        answers["N24News"].append(k)
    (root / "N24News").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(recs), root / "N24News" / "test.parquet")
    # RefCOCO: text query -> image candidates, jsonl
    for j in range(NUM_CLASSES):
        for v in range(3):
            _image(root / "images" / "RefCOCO" / f"c{j}_{v}.png", j, 1000 + 10 * j + v)
    lines = []
    for r in range(rows):
        k = rng.randrange(NUM_CLASSES)
        others = [j for j in range(NUM_CLASSES) if j != k]
        rng.shuffle(others)
        labels = [k] + others
        lines.append(
            json.dumps(
                {
                    "qry_text": f"Select the image of object {k}, variant {r}",
                    "qry_img_path": "",
                    "tgt_text": ["<|image_1|>\nRepresent the given image."] * NUM_CLASSES,
                    "tgt_img_path": [f"RefCOCO/c{j}_{rng.randrange(3)}.png" for j in labels],
                }
            )
        )
        answers["RefCOCO"].append(k)
    (root / "RefCOCO").mkdir(parents=True, exist_ok=True)
    (root / "RefCOCO" / "test.jsonl").write_text("\n".join(lines) + "\n")
    return answers


def item_class(item) -> int:
    if item.image is not None:
        return PALETTE.index(item.image.getpixel((4, 4)))
    words = item.text.replace(",", " ").split()
    for w, nxt in zip(words, words[1:]):
        if w in ("class", "object"):
            return int(nxt)
    raise ValueError(f"no class in {item.text!r}")


def perfect_encoder(items) -> torch.Tensor:
    out = torch.zeros(len(items), NUM_CLASSES)
    for i, it in enumerate(items):
        out[i, item_class(it)] = 1.0
    return out


def item_digest(item) -> bytes:
    h = hashlib.sha256((item.text or "").encode())
    if item.image is not None:
        h.update(item.image.tobytes())
    return h.digest()


def scrambled_encoder(items, dim: int = 16) -> torch.Tensor:
    """Random but deterministic per item: the same item gets the same vector on any rank."""
    vecs = []
    for it in items:
        g = torch.Generator().manual_seed(int.from_bytes(item_digest(it)[:8], "little") % (2**63))
        vecs.append(torch.randn(dim, generator=g))
    return torch.stack(vecs)
