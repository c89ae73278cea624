"""The seekable reader: endless decoded examples of one source of a ``ShardSet``, for one reader slot.

Every (rank, worker) pair is a *reader slot* and reads a disjoint share of every source: its own
shards when a source has at least as many shards as there are slots, else every ``slots``-th sample
of each shard. Shards are resampled (a fresh seeded permutation per pass) so a source never runs
dry, and samples are shuffled per window of raw samples (raw bytes; decoding happens when a sample
is drawn, so the window stays cheap). Every pass order and window permutation is seeded by its own
index, so a reader can start at its ``n``-th example without decoding, or even reading, what came
before: the shards' sample counts (``ShardSet.shard_count``) tell which passes and shards to skip.

A sample that fails to decode (a corrupt image, a malformed JSON, a member its JSON declares but the
shard lacks), one the backbone's processor would refuse (``admit``: its cheap per-item check) and the
rest of a truncated tar are skipped and reported through ``skip(reason, what, where)``, ``reason`` one
of ``shards.SKIP_REASONS``; a remote shard that cannot be had after the retries stops the run with
``ShardUnavailable``.
"""

from __future__ import annotations

import logging
import random
from typing import Callable

from embedkit.data.remote import ShardUnavailable
from embedkit.data.schema import Example
from embedkit.data.shard_set import ShardSet
from embedkit.data.shards import BadSample, Decoding, iter_samples

log = logging.getLogger(__name__)


class SourceReader:
    """Endless decoded examples of one source of a ``ShardSet``, for one reader slot (one (rank,
    worker) pair of ``slots``).

    The raw sample sequence is a series of *passes*; pass ``p`` reads this slot's share of the
    shards in an order drawn from ``(key, p)`` alone. Shuffling is by *window*: the raw samples
    ``[w * buffer, (w + 1) * buffer)`` are permuted by an RNG drawn from ``(key, w)`` alone. So the
    state after ``n`` examples is derivable without replaying them: ``start=n`` counts the shards'
    samples from their tar headers, skips whole passes and shards, and reads (without decoding) at
    most one shard and one window to land on sample ``n``. A skipped sample (``next`` draws the one
    after it) takes a raw position too, so a reader that had skipped ``k`` samples before its example
    ``n`` starts at raw sample ``n + k`` (``skipped=k``: the run's count, from ``TrainBatch.reader_state``).
    """

    def __init__(self, shard_set: ShardSet, name: str, slot: int, slots: int, key: str, buffer: int,
                 skip: Callable[[str, str, str], None], start: int = 0, processor=None, skipped: int = 0,
                 decoding: Decoding | None = None, resize: Callable[[str], None] | None = None):
        self.shard_set, self.name, self.key, self.buffer_size, self.skip = shard_set, name, key, buffer, skip
        self.decoding, self.resize = decoding, resize  # the run's frame policy and image cap; resizes reported
        self.skipped = skipped  # raw samples skipped before this reader's example ``start`` and since
        start += skipped  # the raw sample to start at: every skipped sample took a raw position
        self.processor = processor  # the backbone's chunk processor: its ``refusal`` admits examples
        shards = self.shards = shard_set.sources[name]
        if len(shards) >= slots:
            self.mine, self.stride, self.offset = shards[slot::slots], 1, 0
        else:  # fewer shards than readers: split samples instead
            self.mine, self.stride, self.offset = shards, slots, slot
        self.window, within = divmod(start, buffer)
        self.raw = self._raw(self.window * buffer)
        self.pending: list = []
        self._fill()
        del self.pending[len(self.pending) - within:]  # pending is popped from the end

    def _share(self, shard: str) -> int:
        """How many of ``shard``'s samples this slot reads."""
        c = self.shard_set.shard_count(self.name, shard)
        return max(0, -(-(c - self.offset) // self.stride)) if c > self.offset else 0

    def _seek(self, start: int) -> tuple[int, int, bool]:
        """(pass, raw samples to skip within it) of raw sample ``start``; falls back like ``_raw``."""
        counts = {s: self._share(s) for s in self.mine}
        first = 0
        if not sum(counts.values()):  # this slot's share is empty: the fallback after one empty pass
            self.mine, self.stride, self.offset = self.shards, 1, 0
            counts, first = {s: self._share(s) for s in self.mine}, 1
            if not sum(counts.values()):
                raise RuntimeError(f"training source {self.name!r} has no readable sample")
        p, rem = divmod(start, sum(counts.values()))
        self._counts = counts
        return first + p, rem, bool(first)

    def _raw(self, start: int = 0):
        """Raw samples ``(shard, key, files)`` of this reader's share, pass after pass, from raw sample ``start``."""
        fallback, p, rem = False, 0, 0
        if start:
            p, rem, fallback = self._seek(start)
        while True:
            got, rem = yield from self._one_pass(p, rem)
            p += 1
            if got == 0:
                fallback = self._fall_back(fallback)

    def _one_pass(self, p: int, rem: int):
        """Pass ``p`` over this reader's shards (in that pass's order), its first ``rem`` raw samples skipped;
        returns (raw samples of the share seen, ``rem`` still to skip)."""
        got = 0
        for shard in random.Random(f"{self.key}-pass-{p}").sample(self.mine, len(self.mine)):
            if rem and rem >= self._counts[shard]:  # skip the whole shard: not even opened
                rem -= self._counts[shard]
                got += self._counts[shard]
                continue
            seen, rem = yield from self._read_shard(shard, rem)
            got += seen
        return got, rem

    def _read_shard(self, shard: str, rem: int):
        """This reader's samples of one shard, the first ``rem`` skipped; returns (samples seen, ``rem`` left)."""
        got = 0
        try:
            for i, (key, files) in enumerate(iter_samples(shard)):
                if i % self.stride != self.offset:
                    continue
                got += 1
                if rem:
                    rem -= 1
                    continue
                yield shard, key, files
        except ShardUnavailable:  # a remote shard that cannot be had (retries spent): stop, say which
            raise
        except Exception as exc:  # a truncated or unreadable tar: keep what was read, move on
            self.skip("truncated_shard", f"the rest of {shard} ({exc})", shard)
        return got, rem

    def _fall_back(self, fallback: bool) -> bool:
        """A pass found nothing in this reader's share: read the whole source from now on (once)."""
        if fallback:
            raise RuntimeError(f"training source {self.name!r} has no readable sample")
        log.warning("source %s: this reader's share is empty (fewer samples than readers); "
                    "reading all of it", self.name)
        self.mine, self.stride, self.offset = self.shards, 1, 0
        self._share_total = None  # the share changed
        return True

    def _fill(self) -> None:
        """The next window of raw samples, permuted by its own RNG (popped from the end)."""
        window = [next(self.raw) for _ in range(self.buffer_size)]
        random.Random(f"{self.key}-window-{self.window}").shuffle(window)
        window.reverse()
        self.pending, self.window = window, self.window + 1

    def next(self) -> Example:
        """The next usable example. A whole pass of this reader's share skipped in a row (no usable
        sample in it: every one corrupt or refused) stops the run with the last reason, never a hang."""
        in_a_row = 0
        while True:
            if not self.pending:
                self._fill()
            shard, key, files = self.pending.pop()
            example, reason, why = take(key, files, self.processor, self.decoding, self.resize)
            if example is not None:
                return example
            self.skipped += 1
            in_a_row += 1
            self.skip(reason, f"sample {key} in {shard} ({reason}: {why})", f"{shard}#{key}")
            if in_a_row > self._share_size():
                raise RuntimeError(f"training source {self.name!r} has no usable sample: {in_a_row} skipped in a "
                                   f"row, the last as {reason} ({why})")

    def _share_size(self) -> int:
        """Raw samples in one pass of this reader's share (from the shards' counts, cached)."""
        if getattr(self, "_share_total", None) is None:
            self._share_total = sum(self._share(s) for s in self.mine)
        return max(self._share_total, 1)


def refusal(processor, example: Example) -> str | None:
    """Why ``processor`` would refuse one of the example's items (None: it takes them all): its cheap
    per-item ``refusal`` (``backbones.base.ChunkProcessor``), where it has one."""
    check = getattr(processor, "refusal", None)
    if check is None:
        return None
    for item in (example.query, example.positive, *example.negatives):
        why = check(item)
        if why is not None:
            return why
    return None


def take(key: str, files: dict, processor=None, decoding: Decoding | None = None,
         on_resize: Callable[[str], None] | None = None) -> tuple[Example | None, str, str]:
    """One raw sample, decoded by ``decoding`` (the run's frame policy and image cap; None: the defaults)
    and admitted: (the example, "", "") or (None, skip reason, why). An image resized down to the cap
    is reported to ``on_resize`` (a resize, not a skip)."""
    try:
        example = (decoding or Decoding()).decode(key, files, on_resize)
    except BadSample as exc:
        return None, exc.reason, str(exc)
    except Exception as exc:  # anything else a hostile sample may raise while decoding
        return None, "decode", f"{type(exc).__name__}: {exc}"
    why = refusal(processor, example)
    if why is not None:
        return None, "processor", why
    return example, "", ""
