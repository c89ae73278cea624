"""Mine hard negatives from a trained model, filter false negatives, write new shards with provenance.

For each source (a folder of shards, e.g. one MMEB subset):

1. encode every query and every target (positive) of the subset with the mining model, in chunks
   of ``batch_size`` (progress lines); the embeddings are cached under ``DST/.mine/`` until the
   subset is written, so an interrupted mine does not encode again;
2. retrieve, for each query, its top ``window[1]`` targets by exact matmul, in blocks of queries
   (the query's own positive is not a candidate); rank r is 1-based over the other targets;
3. keep the rank window ``window=[lo, hi]`` (ranks lo..hi inclusive; mmE5 mines from ranks 30-100);
4. drop exact duplicates of the positive (same text and pixels: ``data.schema.content_key``) and
   false negatives: a candidate the judge scores above ``false_negative_bar(pos, threshold)`` =
   ``pos - (1 - threshold) * |pos|`` with ``pos = score(query, positive)``: NV-Retriever's TopK-PercPos
   (``threshold * pos``, threshold 0.95) wherever ``pos >= 0``, and the same margin below ``pos`` when it
   is negative (``threshold * pos`` would put the bar on the wrong side of it there);
5. keep K survivors (``pick=top``: the best-ranked; ``pick=random``: a sample seeded by ``seed`` and
   the example's key) and write each example with its K negatives and their judge scores.

The output keeps the source sharding: ``SRC/<rel>.tar`` becomes ``DST/<rel>.tar`` with the same
examples in the same order. Every shard is written atomically with a sidecar of its counts
(``DST/.mine/<rel>.json``); a shard with both is skipped, so a killed mine resumes. Everything is
deterministic: re-mining the same inputs gives the same bytes. DST's shard-set manifest (written
last, ``data.shard_set.write_manifest``) records the provenance (``mining/provenance.py``).

Memory: the targets of one subset are held as their encoded bytes (what the new shards copy). A slot with
several images or a video is copied as stored and decoded, when it is encoded or judged, with the mining
model's frame policy and image cap (``Encoder.decoding``: its training config's ``data.video``).

Under ``torchrun`` (a process group): each subset's queries and targets are encoded once, split across
the ranks and gathered in input order (``inference.encode_split``), so every rank holds the same
embeddings as one process; rank 0 writes the cache; the shards are dealt round-robin over the ranks
(counting on across subsets), each written by one rank.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from embedkit.data.pixels import fit, open_image
from embedkit.data.schema import Example, Item, content_key
from embedkit.data.shards import (
    Decoding,
    ImageBytes,
    StoredSlot,
    encode_example,
    iter_samples,
    stored_slot,
    write_shard,
)
from embedkit.distributed.ranks import barrier, rank_and_world
from embedkit.fault_points import fault_point
from embedkit.files import atomic_path, write_atomic
from embedkit.inference import LazyItems, encode_split
from embedkit.mining.judges.base import Judge, Pairs

REASONS = ("duplicate", "false_negative")


@dataclass
class MineSettings:
    num_negatives: int
    window: tuple[int, int] = (30, 100)
    threshold: float = 0.95
    pick: str = "top"  # or "random"
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 0  # the inference engine's loader processes (decoding, processing)
    block: int = 1024  # queries per retrieval matmul


def false_negative_bar(pos: float, threshold: float) -> float:
    """The score above which a candidate counts as a false negative: ``threshold * pos`` for ``pos >= 0``
    (NV-Retriever, arXiv 2407.15831, TopK-PercPos), ``pos - (1 - threshold) * |pos|`` in general, so a
    negative positive score (an early or collapsed model, a judge with signed scores) keeps the bar the
    same relative margin below the positive instead of flipping it above."""
    return pos - (1.0 - threshold) * abs(pos)


@dataclass
class Slot:
    """One item as stored in a shard, copied into the new shards verbatim: its text and image bytes, or
    (several images, a video's frames, a video file) the slot as stored, decoded by ``decoding`` (the
    mining model's frame policy and image cap, ``Encoder.decoding``)."""

    text: str | None
    image: ImageBytes | None = None
    stored: StoredSlot | None = None
    decoding: Decoding = field(default_factory=Decoding)

    def item(self) -> Item:
        """The slot decoded as the training reader decodes it (``to_rgb``, the image cap, the frame policy)."""
        if self.stored is not None:
            return self.decoding.item(self.stored)
        if self.image is None:
            return Item(self.text, None)
        image = open_image(self.image.data, f"the image of slot {self.text!r}")
        return Item(self.text, fit(image, self.decoding.max_image_pixels))

    def raw(self) -> Item | StoredSlot:
        return self.stored if self.stored is not None else Item(self.text, self.image)


def _slot(key: str, files: dict[str, bytes], meta: dict, role: str, tag: str, decoding: Decoding) -> Slot:
    return slot_of(key, files, meta[role], tag, decoding)


def slot_of(key: str, files: dict[str, bytes], s: dict, tag: str, decoding: Decoding) -> Slot:
    """The ``Slot`` of one sample JSON slot ``s`` (tag ``q``, ``p``, ``n<i>``), its bytes from ``files``."""
    if s.get("images") or s.get("frames") or s.get("video"):
        return Slot(s.get("text"), stored=stored_slot(key, files, s, tag), decoding=decoding)
    ext = s.get("image")
    return Slot(s.get("text"), ImageBytes(files[f"{key}.{tag}.{ext}"], ext) if ext else None, decoding=decoding)


def read_shard(path: str, decoding: Decoding | None = None) -> list[tuple[str, dict, Slot, Slot]]:
    """(key, meta, query slot, positive slot) of every sample of a shard, in order; ``decoding``: how
    slots with several images or a video are decoded (None: the defaults)."""
    out, decoding = [], decoding or Decoding()
    for key, files in iter_samples(path):
        meta = json.loads(files[f"{key}.json"])
        out.append((key, meta, _slot(key, files, meta, "query", "q", decoding),
                    _slot(key, files, meta, "positive", "p", decoding)))
    return out


class SlotItems(LazyItems):
    """Slots as ``Item``s made on demand (``Slot.item``: the image decoded); ``sized(i)`` reads the
    image's size from its header only (the inference engine's costs)."""

    def __init__(self, slots: Sequence[Slot]):
        self.slots = list(slots)

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, i: int) -> Item:
        return self.slots[i].item()

    def sized(self, i: int) -> Item:
        slot = self.slots[i]
        if slot.stored is not None:
            return _sized_stored(slot)
        if slot.image is None:
            return Item(slot.text, None)
        with Image.open(io.BytesIO(slot.image.data)) as image:  # the header only; closed, never decoded
            return Item(slot.text, image)


def _sized_stored(slot: Slot) -> Item:
    """A stored slot with its sizes known: several images from their headers only; a video sampled by the
    slot's frame policy (its cost is its kept frames, known only by decoding)."""
    names = slot.stored.meta.get("images")
    if not names:
        return slot.item()
    images = []
    for name in names:
        with Image.open(io.BytesIO(slot.stored.members[name])) as image:  # the header only
            images.append(image)
    return Item(slot.text, images=images)


def encode_slots(encoder, slots: Sequence[Slot], batch_size: int, log: Callable[[str], None], what: str,
                 num_workers: int = 0, side: str | None = None) -> torch.Tensor:
    """Embeddings [N, D] (float32, CPU) of ``slots``, ``batch_size`` items per forward pass, through the
    inference engine (``encode_items``: cost-ordered; ``num_workers`` loader processes) in about ten
    windows, one progress line each. ``side="candidate"``: items framed as the model frames documents
    (``Encoder.encode_items(side=)``: GME's default system message); None: as queries."""
    engine = {"num_workers": num_workers} if num_workers else {}
    if side is not None:
        engine["side"] = side
    parts, step = [], max(4 * batch_size, -(-len(slots) // 10))
    for start in range(0, len(slots), step):
        window = SlotItems(slots[start : start + step])
        parts.append(encoder.encode_items(window, batch_size=batch_size, **engine).float().cpu())
        log(f"mine: {what}: encoded {start + len(window)}/{len(slots)}")
    return torch.cat(parts) if parts else torch.empty(0, 0)


def retrieve(q: torch.Tensor, t: torch.Tensor, top: int, block: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) [n, min(top, N-1)]: each query's best targets of ``t`` [N, D] by exact matmul
    (float64), in blocks of ``block`` queries. Query r of ``q`` is example ``offset + r``: its own target
    is never a candidate. Column r of the result is rank r + 1."""
    n = q.shape[0]
    top = min(top, t.shape[0] - 1)
    scores, index = [], []
    for start in range(0, n, block):
        sim = q[start : start + block].double() @ t.double().T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + offset + start] = float("-inf")
        s, i = sim.topk(max(top, 0), dim=1)
        scores.append(s)
        index.append(i)
    return torch.cat(scores), torch.cat(index)


def select(
    q: torch.Tensor, t: torch.Tensor, keys: Sequence[int], settings: MineSettings, judge: Judge,
    queries: Callable[[list[int]], list[Item]], targets: Callable[[list[int]], list[Item]],
    start: int, stop: int, example_keys: Sequence[str],
) -> tuple[list[list[int]], list[list[float]], dict[str, int]]:
    """For each query ``start..stop-1``: the target indices of its mined negatives, their judge scores,
    and the counts (``considered`` in the window, dropped by reason, ``kept``, ``short`` of K).
    ``example_keys`` (one per query) seed ``pick=random``."""
    lo, hi = settings.window
    counts = {"considered": 0, "duplicate": 0, "false_negative": 0, "kept": 0, "short": 0}
    _, index = retrieve(q[start:stop], t, hi, settings.block, offset=start)
    windows = index[:, lo - 1 : hi].tolist()  # ranks lo..hi, 1-based
    picked, picked_scores = [], []
    for b0 in range(0, stop - start, settings.block):
        block = list(range(start + b0, min(start + b0 + settings.block, stop)))
        cands = []  # (position in block, query index, candidate index) after the duplicate filter
        for j, i in enumerate(block):
            cols = windows[i - start]
            counts["considered"] += len(cols)
            for c in cols:
                if keys[c] == keys[i]:
                    counts["duplicate"] += 1
                else:
                    cands.append((j, i, c))
        everything = cands + [(j, i, i) for j, i in enumerate(block)]  # then each query's positive
        qi = [i for _, i, _ in everything]
        ci = [c for _, _, c in everything]
        pairs = Pairs(q[qi], t[ci], lambda qi=qi: queries(qi), lambda ci=ci: targets(ci))
        scores = [float(x) for x in judge.score(pairs).double().cpu().tolist()]
        pos_score = scores[len(cands):]
        survivors: list[list[tuple[int, float]]] = [[] for _ in block]
        for (j, _, c), s in zip(cands, scores):
            if s > false_negative_bar(pos_score[j], settings.threshold):
                counts["false_negative"] += 1
            else:
                survivors[j].append((c, s))
        k = settings.num_negatives
        for j, kept in enumerate(survivors):
            if settings.pick == "random" and len(kept) > k:
                rng = random.Random(f"{settings.seed}-{example_keys[block[j] - start]}")
                kept = [kept[m] for m in sorted(rng.sample(range(len(kept)), k))]
            kept = kept[:k]
            counts["kept"] += len(kept)
            counts["short"] += len(kept) < k
            picked.append([c for c, _ in kept])
            picked_scores.append([round(s, 6) for _, s in kept])
    return picked, picked_scores, counts


class Miner:
    """``run()`` mines every shard of ``sources`` ({subset: [(src shard, rel path)]}) into ``out``."""

    def __init__(self, encoder, judge: Judge, sources: dict[str, list[tuple[str, str]]], out: str | Path,
                 settings: MineSettings, log: Callable[[str], None] = print):
        self.encoder, self.judge, self.sources = encoder, judge, sources
        self.out, self.settings, self.log = Path(out), settings, log
        self.state = self.out / ".mine"
        self.dealt = 0  # shards dealt to the ranks so far, over every subset (the next goes to rank dealt % world)

    def done(self, rel: str) -> bool:
        return (self.out / rel).is_file() and (self.state / f"{rel}.json").is_file()

    def run(self) -> dict[str, dict]:
        """{rel: the shard's stats}, every shard of every subset (read from sidecars where done)."""
        stats: dict[str, dict] = {}
        for subset, shards in self.sources.items():
            if any(not self.done(rel) for _, rel in shards):
                self.mine_subset(subset, shards)
            else:
                self.log(f"mine: {subset}: complete, skipped")
                if rank_and_world()[0] == 0:
                    (self.state / f"{subset}.embeddings.npz").unlink(missing_ok=True)  # killed before its cleanup
            for _, rel in shards:
                stats[rel] = json.loads((self.state / f"{rel}.json").read_text())
        return stats

    def embeddings(self, subset: str, queries: list[Slot], targets: list[Slot]) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.state / f"{subset}.embeddings.npz"
        if cache.is_file():
            with np.load(cache) as z:
                if z["q"].shape[0] == len(queries):
                    self.log(f"mine: {subset}: embeddings from {cache}")
                    return torch.from_numpy(z["q"]), torch.from_numpy(z["t"])
        q = self.encode_split(queries, f"{subset} queries")
        t = self.encode_split(targets, f"{subset} targets", side="candidate")
        if rank_and_world()[0] == 0:
            with atomic_path(cache) as tmp, open(tmp, "wb") as f:
                np.savez(f, q=q.numpy(), t=t.numpy())
            fault_point("mine_cache")
        return q, t

    def encode_split(self, slots: list[Slot], what: str, side: str | None = None) -> torch.Tensor:
        """``encode_slots`` of ``slots``, split across the ranks and gathered in order (every rank gets all)."""
        size, workers = self.settings.batch_size, self.settings.num_workers
        out = encode_split(len(slots), lambda a, b: encode_slots(self.encoder, slots[a:b], size, self.log, what,
                                                                 workers, side))
        return out if out is not None else torch.empty(0, 0)

    def mine_subset(self, subset: str, shards: list[tuple[str, str]]) -> None:
        decoding = getattr(self.encoder, "decoding", None)  # the mining model's frame policy and image cap
        samples = [(rel, read_shard(src, decoding)) for src, rel in shards]
        rows = [s for _, shard in samples for s in shard]
        n = len(rows)
        if n - 1 < self.settings.window[0]:
            self.log(f"mine: {subset}: {n} examples, fewer than the window's first rank: no negatives mined")
        self.log(f"mine: {subset}: {n} examples in {len(shards)} shard(s)")
        queries = [r[2] for r in rows]
        targets = [r[3] for r in rows]
        q, t = self.embeddings(subset, queries, targets)
        keys = [content_key(s.item()) for s in targets]
        start, (rank, world) = 0, rank_and_world()
        for index, (rel, shard) in enumerate(samples, self.dealt):
            stop = start + len(shard)
            if self.done(rel) or index % world != rank:  # done, or another rank's shard
                if self.done(rel):
                    self.log(f"mine: {rel}: complete, skipped")
                start = stop
                continue
            picked, scores, counts = select(
                q, t, keys, self.settings, self.judge, lambda idx: [queries[i].item() for i in idx],
                lambda idx: [targets[i].item() for i in idx], start, stop, [r[0] for r in rows[start:stop]])
            out = []
            for (key, meta, qs, ps), neg, sc in zip(shard, picked, scores):
                ex = Example(qs.raw(), ps.raw(), [targets[c].raw() for c in neg], meta.get("task", "default"),
                             negative_scores=sc)
                out.append(encode_example(ex, key))
            write_shard(self.out / rel, out)
            fault_point("mine_shard")
            counts["examples"] = len(shard)
            write_atomic(self.state / f"{rel}.json", json.dumps(counts, sort_keys=True) + "\n")
            self.log(f"mine: wrote {rel}: {len(shard)} examples, {counts['kept']} negatives "
                     f"(dropped {counts['duplicate']} duplicates, {counts['false_negative']} false negatives)")
            start = stop
        self.dealt += len(samples)
        barrier()  # every rank's shards written before the cache goes
        if rank == 0:
            (self.state / f"{subset}.embeddings.npz").unlink(missing_ok=True)
