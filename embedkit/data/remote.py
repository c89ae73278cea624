"""Shards that are not local files: ``http(s)://`` URLs, fsspec URLs (``s3://``, ``gs://``, ...) and
``pipe:`` commands, written as WebDataset users write them.

    https://host/mmeb/train-{000000..000127}.tar     brace expansion (the whole spec, pipe: too)
    s3://bucket/mmeb/                               a prefix: every .tar under it (fsspec listing)
    https://host/mmeb/                              a prefix on a server with an index page
    pipe:aws s3 cp s3://bucket/train-000000.tar -   a command whose stdout is the shard

``http(s)`` is read with the standard library; every other scheme goes through fsspec (the
optional extra ``embedkit[remote]``: fsspec, s3fs; credentials come from the environment as the
filesystem library reads them, e.g. ``AWS_ACCESS_KEY_ID`` / ``AWS_ENDPOINT_URL`` for s3).

``open_shard`` returns a forward-reading file object for ``tarfile``. A dropped connection, a
timeout or a server error is retried with exponential back-off (``RETRIES`` tries without
progress, ``BACKOFF`` seconds doubling up to ``MAX_BACKOFF``); the read resumes at the byte already
read: with an HTTP ``Range`` request when the server honours it (206), else (a 200, an fsspec file
that cannot seek, a ``pipe:`` command run again) by re-reading from the start and discarding the
bytes already delivered. Either way the tar parser above sees each byte once, so each sample is
yielded once. A shard that cannot be had (404, denied, retries spent) raises ``ShardUnavailable``,
a ``UserError`` whose one line names the URL.

Nothing here runs for a local path: ``is_remote`` is a string test and the rest is imported lazily.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from http.client import HTTPException

from embedkit.errors import UserError

RETRIES = int(os.environ.get("EMBEDKIT_SHARD_RETRIES", "6"))  # consecutive tries without progress
BACKOFF = 1.0  # seconds before the first retry; doubles each time
MAX_BACKOFF = 30.0
TIMEOUT = 60.0  # seconds a socket may stay silent
CHUNK = 1 << 20
_KEEP = 1 << 16  # bytes kept behind the read position: tarfile seeks back a block to check the end marker

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ShardUnavailable(UserError):
    """A shard that cannot be had. Its message is one line naming the URL, also when a DataLoader
    worker re-raises it (PyTorch passes the worker's whole traceback as the message: its last line
    is ours)."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and "Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class NotThere(ShardUnavailable):
    """The file does not exist (HTTP 404/410, ``FileNotFoundError``): for an optional file, its absence."""


class _Retry(Exception):
    """A failure worth another try (connection dropped, timeout, 5xx, a command that failed)."""


def is_remote(spec) -> bool:
    s = str(spec)
    return s.startswith("pipe:") or (bool(_SCHEME.match(s)) and not s.startswith("file://"))


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


# -- naming shards ------------------------------------------------------------------------------
def expand(spec: str) -> list[str]:
    """The shard URLs of a remote spec: brace expansion, or the ``.tar`` files under a prefix."""
    spec = str(spec)
    if spec.startswith("pipe:") or "{" in spec:
        import braceexpand

        return list(braceexpand.braceexpand(spec))
    if spec.endswith(".tar"):
        return [spec]
    return list_prefix(spec)


def _filesystem(url: str):
    try:
        import fsspec
    except ModuleNotFoundError:
        raise UserError(f"reading {url} needs fsspec: pip install 'embedkit[remote]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # e.g. s3fs missing, an unknown protocol
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot open {url}: {msg} (pip install 'embedkit[remote]')") from None


def list_prefix(url: str) -> list[str]:
    """Every ``.tar`` under a prefix (recursively), sorted, as full URLs."""
    fs, path = _filesystem(url)
    try:
        found = fs.find(path)
    except Exception as exc:  # noqa: BLE001 - any listing failure is the user's URL, said in one line
        raise ShardUnavailable(f"cannot list {url} ({type(exc).__name__}: {_one_line(exc)})") from None
    return sorted(fs.unstrip_protocol(p) for p in found if p.endswith(".tar"))


def probe(url: str) -> None:
    """Raise ShardUnavailable unless the first bytes of ``url`` can be had (a ``pipe:`` is not run)."""
    if url.startswith("pipe:"):
        return
    with open_shard(url) as f:
        f.read(1)


# -- reading one shard --------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _HttpSource:
    """One GET of ``url`` from byte ``offset`` (``Range``); ``start`` is where its bytes begin."""

    def __init__(self, url: str, offset: int):
        headers = {"User-Agent": "embedkit"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            self.resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # nothing left past offset: treat as a server without Range
                raise _Retry(f"HTTP 416 at byte {offset}") from None
            if exc.code in (408, 425, 429) or exc.code >= 500:
                raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
            error = NotThere if exc.code in (404, 410) else ShardUnavailable
            raise error(f"shard {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise _Retry(_one_line(reason) if isinstance(reason, BaseException) else str(reason)) from None
        self.start = 0
        length = self.resp.headers.get("Content-Length")
        self.end = int(length) if length and length.isdigit() else None
        if self.resp.status == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", self.resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                self.close()
                raise _Retry(f"unexpected Content-Range {self.resp.headers.get('Content-Range')!r}")
            self.start = offset
            self.end = int(m.group(2)) + 1
        elif self.end is not None:
            self.end = self.start + self.end

    def read(self, pos: int, n: int) -> bytes:
        try:
            data = self.resp.read(n)
        except (HTTPException, OSError) as exc:
            raise _Retry(_one_line(exc)) from None
        if not data and self.end is not None and pos < self.end:  # http.client returns b"" on a cut
            raise _Retry(f"connection closed at byte {pos} of {self.end}")
        return data

    def close(self) -> None:
        self.resp.close()


class _FsspecSource:
    def __init__(self, url: str, offset: int):
        fs, path = _filesystem(url)
        try:
            self.f = fs.open(path, "rb")
        except (FileNotFoundError, PermissionError) as exc:
            error = NotThere if isinstance(exc, FileNotFoundError) else ShardUnavailable
            raise error(f"shard {url}: {type(exc).__name__}: {_one_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - network errors of any filesystem library
            raise _Retry(f"{type(exc).__name__}: {_one_line(exc)}") from None
        self.start = 0
        if offset:
            try:
                self.f.seek(offset)
                self.start = offset
            except Exception:  # noqa: BLE001 - not seekable: re-read and skip
                self.start = 0

    def read(self, pos: int, n: int) -> bytes:
        try:
            return self.f.read(n)
        except (FileNotFoundError, PermissionError) as exc:
            raise ShardUnavailable(f"{type(exc).__name__}: {_one_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001
            raise _Retry(f"{type(exc).__name__}: {_one_line(exc)}") from None

    def close(self) -> None:
        self.f.close()


class _PipeSource:
    """``pipe:CMD``: the command's stdout (run by the shell); a non-zero exit is a failed read."""

    def __init__(self, url: str, offset: int):
        self.cmd = url[len("pipe:"):]
        # its own process group, so closing the shard early stops the whole pipeline, not just the shell
        self.proc = subprocess.Popen(self.cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.start = 0

    def read(self, pos: int, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if not data:
            code = self.proc.wait()
            if code:
                err = self.proc.stderr.read().decode(errors="replace").strip()
                raise _Retry(f"command exited with {code}" + (f": {err.splitlines()[-1]}" if err else ""))
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


class RemoteShard:
    """A read-only file object over a remote shard that survives dropped connections.

    Reads go forward; ``seek`` goes forward anywhere (reading) and back by at most ``_KEEP`` bytes,
    which is all ``tarfile`` needs when members are read in order."""

    def __init__(self, url: str):
        self.name = url
        self.mode = "rb"
        self._source_type = _PipeSource if url.startswith("pipe:") else _HttpSource if _is_http(url) else _FsspecSource
        self._src = None
        self._fetched = 0  # bytes taken from the source so far (the end of _tail)
        self._tail = bytearray()  # the last bytes fetched, for short seeks back
        self._pos = 0  # the reader's position
        self.retries = 0  # retries done (for tests and logs)
        self.closed = False

    # -- the source, reopened at the byte already fetched ------------------------------------
    def _fetch(self, n: int) -> bytes:
        failures = 0
        while True:
            try:
                if self._src is None:
                    self._open()
                data = self._src.read(self._fetched, n)
                if data:
                    self._fetched += len(data)
                    self._tail += data
                    if len(self._tail) > 2 * _KEEP:
                        del self._tail[:-_KEEP]
                return data
            except _Retry as exc:
                self._drop()
                failures += 1
                if failures >= RETRIES:
                    raise ShardUnavailable(f"shard {self.name}: unreadable after {failures} tries "
                                           f"at byte {self._fetched} ({exc})") from None
                self.retries += 1
                time.sleep(min(MAX_BACKOFF, BACKOFF * 2 ** (failures - 1)))
            except ShardUnavailable as exc:
                self._drop()
                msg = str(exc)
                raise type(exc)(msg if self.name in msg else f"shard {self.name}: {msg}") from None

    def _open(self) -> None:
        src = self._source_type(self.name, self._fetched)
        skip = self._fetched - src.start  # the source starts earlier (no Range): discard what we have
        while skip > 0:
            got = src.read(src.start, min(skip, CHUNK))
            if not got:
                src.close()
                raise _Retry(f"shard ended at byte {self._fetched - skip} on re-reading, before byte {self._fetched}")
            skip -= len(got)
            src.start += len(got)
        self._src = src

    def _drop(self) -> None:
        if self._src is not None:
            try:
                self._src.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass
            self._src = None

    # -- file protocol -------------------------------------------------------------------------
    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        if self._pos < self._fetched:  # after a short seek back: serve from the tail
            behind = self._fetched - self._pos
            start = len(self._tail) - behind
            take = behind if n < 0 else min(n, behind)
            out += self._tail[start:start + take]
            self._pos += take
        while n < 0 or len(out) < n:
            data = self._fetch(CHUNK if n < 0 else max(n - len(out), 1))
            if not data:
                break
            out += data
            self._pos += len(data)
        return bytes(out)

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        target = {0: offset, 1: self._pos + offset}.get(whence)
        if target is None:
            raise OSError("RemoteShard cannot seek from the end")
        if target < self._fetched - len(self._tail):
            raise OSError(f"RemoteShard cannot seek back to byte {target} (read position {self._pos})")
        if target <= self._fetched:
            self._pos = target
        else:
            self._pos = self._fetched
            while self._fetched < target:
                if not self._fetch(min(CHUNK, target - self._fetched)):
                    break
            self._pos = self._fetched
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._drop()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(url: str) -> RemoteShard:
    return RemoteShard(str(url))


def read_if_there(url: str) -> bytes | None:
    """The bytes of a small remote file (a shard set's manifest), None when it does not exist; any
    other failure (after the retries) raises ``ShardUnavailable``, so every rank sees the same answer."""
    if url.startswith("pipe:"):
        return None
    try:
        with open_shard(url) as f:
            return f.read()
    except NotThere:
        return None
