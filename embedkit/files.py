"""Atomic file writes: a partial output never stands under its final name.

``atomic_path(path)`` yields the temporary name ``temp_path(path)`` in the same folder; on success it
is renamed onto ``path`` (``os.replace`` is atomic within one file system), on failure removed.
``write_atomic`` is the one-call form for text or bytes. ``move_into_place`` is the rename alone, for
a write split between processes (every rank writes a checkpoint, one renames it); ``link_atomic``
gives a finished file a second name. The temporary name is fixed (``.<name>.tmp``, which no shard or
checkpoint glob matches): a run killed mid-write leaves at most one stale temporary, which the next
write of the same file replaces.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the file system is out of space (or the user's quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def temp_path(path: str | Path) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto ``path`` when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        move_into_place(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, content: str | bytes) -> None:
    with atomic_path(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)


def move_into_place(path: str | Path) -> Path:
    """Rename ``temp_path(path)``, written completely, onto ``path`` (atomic); returns ``path``."""
    path = Path(path)
    os.replace(temp_path(path), path)
    return path


def link_atomic(src: str | Path, dst: str | Path) -> None:
    """``dst`` becomes ``src`` (a hard link, else a copy where links are refused) in one rename."""
    import shutil

    tmp = temp_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    move_into_place(dst)


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """The objects of a JSON Lines file, blank lines skipped; ``UserError`` (one line, ``what`` first: the
    option or file role being read) for a line that is not JSON or not an object."""
    from embedkit.errors import UserError

    rows = []
    for n, row, why in jsonl_lines(path):
        if why is not None:
            raise UserError(f"{what}: {path}:{n} is {why}")
        rows.append(row)
    return rows


def jsonl_lines(path: str | Path, errors: str = "strict"):
    """(line number, object, None) per non-blank line of a JSON Lines file, or (line number, None, why) for a
    line that is not a JSON object (``why``: "not JSON (<reason>)" or "not a JSON object"); the caller decides
    whether a bad line stops it (``read_jsonl``) or is skipped and reported (``data mmeb-v2``). ``errors``:
    ``open``'s handling of bytes that are not UTF-8."""
    import json

    with open(path, encoding="utf-8", errors=errors) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, None, f"not JSON ({exc.msg})"
                continue
            yield (n, row, None) if isinstance(row, dict) else (n, None, "not a JSON object")


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
