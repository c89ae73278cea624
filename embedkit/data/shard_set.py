"""A shard set: training shards grouped into sources, each source's sample count and query modality,
and the set's ``manifest.json`` (read and written here, nowhere else).

Layout (``embedkit data mmeb`` and ``embedkit mine`` write it; a folder of hand-made shards is one too)::

    ROOT/manifest.json                optional
    ROOT/<source>/train-000000.tar    a *source* is one folder of shards (an MMEB subset)

``manifest.json`` records what is known at write time, so nothing needs to open (or download) a tar
to learn it::

    {"subsets": {<source>: {"count": examples,
                            "query_modality": "image" | "text",                    (optional)
                            "shards": [{"path": "<source>/train-000000.tar", "count": n, ...}],  (optional)
                            ...},
                 ...},
     ...}                              the writer's own keys: mmeb's format/split/src/total, mine's "mining"

Only ``subsets.<source>.count`` is needed; manifests written before ``query_modality`` and per-shard
counts were recorded still read. Shards at the root itself (``ROOT/x.tar``, as ``mine`` keeps a flat
source) are the subset ``"."`` of ``ROOT/manifest.json``; the manifest of a source folder ``F`` is
otherwise ``F/../manifest.json``. Remote sets (URLs) read the manifest at the same place over the
network; a missing one means "nothing recorded".

Counting rule (one, everywhere): a sample is a run of consecutive tar members sharing a key (the file
name up to the first dot: WebDataset's grouping); a cut tar's last run is not counted, as the stream
never yields it (``shards.count_samples``). A source's count is the manifest's where recorded, else its
tars' samples by that rule.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from embedkit.data.remote import ShardUnavailable, is_remote
from embedkit.data.shards import count_samples, iter_samples, slot_has_visual
from embedkit.files import write_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MODALITIES = ("image", "text")  # a query with a visual (images or a video), a text-only query


def group_shards(shards: list[str]) -> dict[str, list[str]]:
    """Source name (the shard's folder name; the folder's path when two folders share a name) -> its
    shards, sorted."""
    by_dir: dict[Path, list[str]] = {}
    for s in shards:
        by_dir.setdefault(Path(s).parent, []).append(str(s))
    names = [d.name or str(d) for d in by_dir]
    unique = len(set(names)) == len(names)
    return {(d.name or str(d)) if unique else str(d): sorted(v) for d, v in sorted(by_dir.items())}


def manifest_dumps(manifest: dict) -> str:
    """The manifest's bytes: sorted keys and no timestamps, so the same inputs give the same file."""
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"


def write_manifest(root: str | Path, manifest: dict) -> Path:
    """Write ``ROOT/manifest.json`` atomically (a reader never sees half of it); returns its path."""
    path = Path(root) / MANIFEST
    write_atomic(path, manifest_dumps(manifest))
    return path


def _parent(location: str) -> str:
    return location.rsplit("/", 1)[0] if is_remote(location) else str(Path(location).parent)


def _name(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1] if is_remote(location) else Path(location).name


def _join(location: str, name: str) -> str:
    return f"{location}/{name}" if is_remote(location) else str(Path(location) / name)


class ShardSet:
    """Training shards by source, with counts and query modalities from ``manifest.json`` where recorded.

    ``shards``: shard paths or URLs (grouped by folder, ``group_shards``) or an already grouped
    ``{source: [shard, ...]}``. Manifests are read once per instance, on first use.
    """

    def __init__(self, shards: list[str] | dict[str, list[str]]):
        self.sources: dict[str, list[str]] = (
            {n: list(v) for n, v in shards.items()} if isinstance(shards, dict) else group_shards(list(shards)))
        # manifest location -> (its bytes, parsed) or None (absent): read and parsed once per instance
        self._manifests: dict[str, tuple[bytes, dict] | None] = {}
        self._modality: dict[str, str] = {}

    @property
    def shards(self) -> list[str]:
        return [s for group in self.sources.values() for s in group]

    # -- the manifest ---------------------------------------------------------------------------
    def _places(self, source: str) -> list[tuple[str, str]]:
        """(manifest location, its subsets key) that may describe ``source``, in the order looked at."""
        folder = _parent(self.sources[source][0])
        return [(_join(_parent(folder), MANIFEST), _name(folder)), (_join(folder, MANIFEST), ".")]

    def _read(self, location: str) -> tuple[bytes, dict] | None:
        if location not in self._manifests:
            if is_remote(location):
                from embedkit.data.remote import read_if_there

                data = read_if_there(location)
            else:
                path = Path(location)
                data = path.read_bytes() if path.is_file() else None
            self._manifests[location] = None if data is None else (data, json.loads(data))
        return self._manifests[location]

    def _manifest(self, location: str) -> dict | None:
        read = self._read(location)
        return read[1] if read is not None else None

    def entry(self, source: str) -> dict:
        """The manifest's record of ``source`` (``subsets.<name>``); {} when nothing is recorded."""
        for location, key in self._places(source):
            manifest = self._manifest(location)
            if manifest is not None and key in manifest.get("subsets", {}):
                return manifest["subsets"][key] or {}
        return {}

    def manifest_sha256(self, holding: str) -> str | None:
        """sha256 of the manifest of the first source when it has the top-level key ``holding``
        (``"mining"``: the mined shards' provenance), else None."""
        if not self.sources:
            return None
        for location, _ in self._places(next(iter(self.sources))):
            read = self._read(location)
            if read is not None and holding in read[1]:
                return hashlib.sha256(read[0]).hexdigest()
        return None

    # -- counts -----------------------------------------------------------------------------------
    def recorded_count(self, source: str) -> int | None:
        """The manifest's example count of ``source``; None when not recorded (or recorded as 0)."""
        count = self.entry(source).get("count")
        return int(count) if count else None

    def count(self, source: str) -> int:
        """Examples of ``source``: the manifest's count, else its tars' samples (the module's rule)."""
        recorded = self.recorded_count(source)
        return recorded if recorded is not None else sum(count_samples(s) for s in self.sources[source])

    def total(self) -> int:
        """Examples of every source."""
        return sum(self.count(name) for name in self.sources)

    def shard_count(self, source: str, shard: str) -> int:
        """Samples of one shard of ``source``. A local tar is counted from its headers (cheap, and true
        even of a tar cut after the manifest was written); a remote one takes the manifest's per-shard
        count where recorded, and is otherwise read through once for its headers."""
        if is_remote(shard):
            name = _name(shard)
            for item in self.entry(source).get("shards", []):
                if isinstance(item, dict) and _name(str(item.get("path", ""))) == name and "count" in item:
                    return int(item["count"])
        return count_samples(shard)

    # -- query modality ---------------------------------------------------------------------------
    def query_modality(self, source: str, probe: int = 32) -> str:
        """``"image"`` or ``"text"``: the manifest's ``query_modality`` for ``source`` where recorded,
        else the majority of its first ``probe`` samples' queries (their JSON only; ties: image). A query
        with several images or a video counts as ``"image"`` (visual)."""
        if source not in self._modality:
            recorded = self.entry(source).get("query_modality")
            self._modality[source] = recorded if recorded in MODALITIES else self._probe(source, probe)
        return self._modality[source]

    def _probe(self, source: str, probe: int) -> str:
        votes: Counter = Counter()
        for shard in self.sources[source]:
            try:
                for key, files in iter_samples(shard):
                    try:
                        votes[slot_has_visual(json.loads(files[f"{key}.json"])["query"])] += 1
                    except (KeyError, ValueError, TypeError, AttributeError):
                        continue  # a malformed sample: the stream skips it too
                    if sum(votes.values()) >= probe:
                        break
            except ShardUnavailable:
                raise
            except Exception:  # a truncated or unreadable tar: what was read counts
                pass
            if sum(votes.values()) >= probe:
                break
        if not votes:
            raise RuntimeError(f"training source {source!r} has no readable sample")
        return "image" if votes[True] >= votes[False] else "text"
