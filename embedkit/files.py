"""Atomic file writes: a partial output never stands under its final name.

``atomic_path(path)`` yields the temporary name ``temp_path(path)`` in the same folder; on success it
is renamed onto ``path`` (``os.replace`` is atomic within one file system), on failure removed.
``write_atomic`` is the one-call form for text or bytes. The temporary name is fixed (``.<name>.tmp``,
which no shard or checkpoint glob matches): a run killed mid-write leaves at most one stale
temporary, which the next write of the same file replaces.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, content: str | bytes) -> None:
    with atomic_path(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
