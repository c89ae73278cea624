"""MMEB-V2's 36 image tasks are MMEB-V1's (mmeb-v2.md section 1): the V1 layout, read by ``eval/mmeb.py``.

``<root>/<Task>/test.parquet | test-*.parquet | test.jsonl`` with ``qry_text``, ``qry_img_path``,
``tgt_text``, ``tgt_img_path`` (the instruction is in the texts), images under ``<root>/images/`` (or
``<root>/``). Local: each row's query ranked against its own candidate list, whose first entry is the
answer (VLM2Vec's protocol, as ``mmeb.evaluate_rows`` scores it).
"""

from __future__ import annotations

from pathlib import Path

from embedkit.eval import mmeb
from embedkit.eval.corpus_tasks import CorpusTask
from embedkit.eval.mmeb_v2.parsers.common import Builder, MissingData, join


def _image(b: Builder, root: Path, rel: str) -> list | None:
    if not rel:
        return None
    for base in (root / "images", root):
        if (base / rel).is_file():
            return [str(base / rel)]
    b.missing.append(f"image not found: {rel} (under {root / 'images'} or {root})")
    return None


def image(pin, root: Path) -> CorpusTask:
    root = Path(root)
    if not mmeb.dataset_files(root, pin.name):
        raise MissingData([f"no {root / pin.name}/{'|'.join(mmeb.FILE_PATTERNS)}"])
    b = Builder(pin, root / pin.name)
    for row in mmeb.load_dataset(root, pin.name):
        cands = [b.doc(join(pin.candidate_instruction, t), images=_image(b, root, p))
                 for t, p in zip(row.tgt_text, row.tgt_img_path)]
        b.query(join(pin.query_instruction, row.qry_text), {cands[0]: 1.0},
                images=_image(b, root, row.qry_img_path), candidates=cands)
    return b.build()
