"""EmbeddingDataModule: training batches streamed from shards, and the held-out validation set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from embedkit.data import demo_visual
from embedkit.data.batch import ChunkCollate, ValCollate, ValItems
from embedkit.data.remote import ShardUnavailable, is_remote
from embedkit.data.shards import Decoding, iter_samples, list_shards
from embedkit.data.stream import ShardStream
from embedkit.data.workers import WorkerSignals
from embedkit.errors import ConfigError, UserError


def check_shards(data: dict) -> tuple[list[str] | None, list[str] | None]:
    """The cheap half of ``resolve_shards``, every user error included and nothing drawn: (training
    shards, validation shards) of the ``data`` section, None for a side the demo data will supply.
    Without the demo (``data.demo.enabled``), ``train.shards`` is required and a missing
    ``val.shards`` means no held-out validation ([])."""
    use_demo = data["demo"]["enabled"]
    if data["train"]["shards"] is None and not use_demo:
        raise ConfigError("data.train.shards is not set: this recipe trains on real data; convert MMEB with "
                          "`embedkit data mmeb src=DIR out=SHARDS` and pass data.train.shards=SHARDS "
                          "(or data.demo.enabled=true for the drawn demo data)")
    train = None if data["train"]["shards"] is None else checked_shards("data.train.shards", data["train"]["shards"])
    if data["val"]["shards"] is not None:
        val = checked_shards("data.val.shards", data["val"]["shards"])
    else:
        val = None if use_demo else []
    return train, val


def resolve_shards(data: dict, log=print, checked: tuple | None = None) -> tuple[list[str], list[str]]:
    """(training shards, validation shards) of the ``data`` section: ``train.shards`` / ``val.shards``,
    or the demo's, drawn and written (once, into its cache) where the recipe asks for the demo data.
    ``checked``: ``check_shards(data)``'s answer, when already taken."""
    train, val = checked if checked is not None else check_shards(data)
    if train is not None and val is not None:
        return train, val
    demo_dir = Path(demo_visual.ensure_shards(data["demo"], log=log))
    if train is None:
        train = sorted(str(p) for p in demo_dir.glob("*/train-*.tar"))
    if val is None:
        val = [str(demo_dir / "val-000000.tar")]
    return train, val


def checked_shards(key: str, spec) -> list[str]:
    """The shards of ``spec``: local files must exist; of remote ones (URLs, ``pipe:``) the first is
    probed, so a wrong host, bucket or credential fails here, in one line naming the URL."""
    if not is_remote(spec):
        shards = list_shards(spec)
        if not shards or not all(Path(s).is_file() for s in shards):
            raise UserError(f"{key}: no .tar shards found at {spec}")
        return shards
    from embedkit.data.remote import probe

    try:
        shards = list_shards(spec)
        if not shards:
            raise UserError(f"no .tar shards found at {spec}")
        probe(shards[0])
    except UserError as exc:
        raise UserError(f"{key}: {exc}") from None
    return shards


def read_examples(shards: list[str], limit: int, processor=None, decoding=None) -> list:
    """The first ``limit`` usable examples of ``shards`` (validation): a sample that does not decode or that
    ``processor`` would refuse, and the rest of a truncated shard, are skipped and counted in one warning."""
    return [example for example, _ in read_samples(shards, limit, processor, decoding)]


def read_samples(shards: list[str], limit: int, processor=None, decoding=None) -> list[tuple]:
    """``read_examples`` with each example's sample JSON: [(example, JSON dict)]."""
    import logging
    from collections import Counter

    from embedkit.data.reader import take

    out, skipped = [], Counter()
    for shard in shards:
        try:
            for key, files in iter_samples(shard):
                example, reason, _ = take(key, files, processor, decoding)
                if example is None:
                    skipped[reason] += 1
                    continue
                out.append((example, _sample_json(files, key)))
                if len(out) >= limit:
                    break
        except ShardUnavailable:
            raise
        except Exception:  # a truncated or unreadable tar: what was read counts
            skipped["truncated_shard"] += 1
        if len(out) >= limit:
            break
    if skipped:
        logging.getLogger(__name__).warning("validation data: skipped %s", dict(skipped))
    return out


def _sample_json(files: dict, key: str) -> dict:
    import json

    raw = files.get(f"{key}.json")
    return json.loads(raw) if raw else {}


@dataclass(frozen=True)
class HeldOut:
    """What the held-out ranking scores: its ``metric`` (``p@1``; ``t2v_r@1`` for text -> video;
    ``ndcg@5`` where the samples carry graded qrels) and, for graded sets, ``qrels``: per query (= per
    held-out example), ``{candidate index: grade}`` over the candidates (= the examples' positives).

    Graded qrels come from the samples' JSON: ``"doc_id"`` names the sample's positive, ``"qrels"``
    maps doc ids to grades (docs/demos.md); a doc id that names no read sample is dropped."""

    metric: str = "p@1"
    qrels: list | None = None

    @classmethod
    def of(cls, samples: list[tuple]) -> "HeldOut":
        if samples and all("qrels" in meta and "doc_id" in meta for _, meta in samples):
            index = {meta["doc_id"]: i for i, (_, meta) in enumerate(samples)}
            qrels = [{index[d]: g for d, g in meta["qrels"].items() if d in index} for _, meta in samples]
            return cls("ndcg@5", qrels)
        if samples and all(not ex.query.has_visual and ex.positive.video is not None for ex, _ in samples):
            return cls("t2v_r@1")
        return cls()


class EmbeddingDataModule(L.LightningDataModule):
    """Training batches of the ``data`` section's ``train`` block, validation of its ``val`` block.

    ``global_batch_size`` is the contrastive batch across all ranks, split evenly; ``chunk_size``
    and ``chunk_tokens`` cut each side of a device's batch into forward passes (ordered by cost
    first when ``sort_chunks``); ``b3``: a ``data.b3.B3Partition`` to draw the batches from
    (``data.train.batching=b3``), else None; ``processor`` (the
    encoder's) runs in the DataLoader workers, which ignore the stop signals (SIGTERM, SIGINT and
    ``stop_signals``, e.g. ``["SIGUSR1"]``): the main process decides when to stop (``WorkerSignals``).
    """

    def __init__(self, data: dict, processor, train_shards: list[str], val_shards: list[str], *, seed: int,
                 global_batch_size: int, chunk_size: int, chunk_tokens: int = 0, accumulate: int = 1,
                 sort_chunks: bool = False, stop_signals: list[str] | None = None, b3=None):
        super().__init__()
        self.b3 = b3  # data.train.batching=b3: the partition (data/b3.py) the stream draws its batches from
        self.stop_signals = list(stop_signals or [])
        self.train_data = data["train"]
        self.processor = processor
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.chunk_size = chunk_size
        self.chunk_tokens = chunk_tokens
        self.sort_chunks = sort_chunks  # cost-aware chunking (ChunkCollate)
        self.accumulate = accumulate  # training batches per optimizer step: where a resumed stream starts
        val = data["val"]
        self.decoding = Decoding.from_config(data)  # data.video and data.max_image_pixels, for training and validation
        samples = (read_samples(val_shards, val["max_queries"], processor, self.decoding)
                   if val["enabled"] and val_shards else [])
        self.val_examples = [example for example, _ in samples]
        self.held_out = HeldOut.of(samples)  # the metric the module's validation logs, and its qrels
        self.reader_states: dict[int, dict] = {}  # worker -> reader_state of its last batch trained on (this rank)
        self.resume_states: dict[int, dict] = {}  # the same, from the checkpoint a resumed fit started from

    def train_dataloader(self):
        t = self.train_data
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        gbs = self.global_batch_size
        if gbs % world:
            raise UserError(f"train.global_batch_size={gbs} is not divisible by the {world} devices")
        collate = ChunkCollate(self.processor, self.chunk_size, t["num_negatives"], self.chunk_tokens,
                               sort=self.sort_chunks)
        # a resumed fit (trainer.global_step restored by now) starts the stream at its batch
        start = self.trainer.global_step * self.accumulate if self.trainer else 0
        try:
            stream = ShardStream(self.train_shards, collate, gbs // world, self.seed, rank, world, t["shuffle_buffer"],
                                 mix=t["mix"], task_batch_size=t["task_batch_size"], epoch_steps=t["epoch_steps"],
                                 start_step=start, accumulate=self.accumulate, group_by=t["group_by"],
                                 length_order=t["length_order"], resume_states=self.resume_states,
                                 decoding=self.decoding, b3=self.b3)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        workers = t["num_workers"]
        # own generators: creating a loader's iterator must not draw from the global torch RNG (a
        # resumed run creates them at other points of the run than the uninterrupted one)
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                          prefetch_factor=4 if workers > 0 else None, generator=self._generator(),
                          pin_memory=self.pin_memory(), worker_init_fn=self._worker_init(rank) if workers else None)

    # -- exact resume past skipped samples: where each worker's readers stood, in the checkpoint -------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Keep the ``reader_state`` of each training batch as it is trained on (in the main process; a
        batch still in the loader's prefetch queue is not)."""
        state = getattr(batch, "reader_state", None)
        if state is not None:
            self.reader_states[state["worker"]] = state
        return batch

    def state_dict(self) -> dict:
        """Every rank's reader states (gathered: each rank reads its own shares)."""
        import torch.distributed as dist

        states = [self.reader_states]
        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, self.reader_states)
        return {"reader_states": states}

    def load_state_dict(self, state: dict) -> None:
        rank = self.trainer.global_rank if self.trainer else 0
        states = state.get("reader_states") or []
        self.resume_states = dict(states[rank]) if rank < len(states) else {}
        # a worker that gives no batch before the next checkpoint is still where the resume put it
        self.reader_states = dict(self.resume_states)

    def val_dataloader(self):
        # one role per chunk (``ValItems(chunk_size)``): each chunk is processed for its side (GME's system messages)
        return DataLoader(ValItems(self.val_examples, self.chunk_size), batch_size=None,
                          collate_fn=ValCollate(self.processor), num_workers=0, generator=self._generator(),
                          pin_memory=self.pin_memory())

    def _worker_init(self, rank: int) -> WorkerSignals:
        """The workers' init: stop signals left to the main process, and the per-worker seeding
        Lightning adds after ``seed_everything(workers=True)`` to loaders without an init of their own."""
        import os

        return WorkerSignals(self.stop_signals, rank, seed=bool(int(os.environ.get("PL_SEED_WORKERS", 0))))

    def pin_memory(self) -> bool:
        """Batches in page-locked memory when training on CUDA (asynchronous host-to-device copies);
        never on the CPU, where pinning is a pointless copy."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    def _generator(self):
        import torch

        return torch.Generator().manual_seed(self.seed)
