"""``RunDir``: the one owner of a run directory's layout. Paths, YAML, the run's lock and a cheap check
that a checkpoint file reads (the ground floor: no torch import).

    <run>/config.yaml                 the resolved config the run trained with
    <run>/checkpoints/step-NNNNNNNN.ckpt, last.ckpt   (last.ckpt: a link to the newest step file)
    <run>/mlflow_run_id               the MLflow run the run logs to (so a resume continues it)
    <run>/eval/, <run>/eval-l<L>_d<D>/   evaluation outputs (the full model; a model cut to a depth)
    <run>/.lock                       held (``flock``) by the one ``embedkit fit`` writing the run; names its pid and host
    <run>/b3_partition.json           data.train.batching=b3: the clusters the batches are drawn from (data/b3.py)
    <run>/lineage.json                the run's parents (``init_from``; merge's inputs), each with its own lineage

Every verb and library module reaches these through this class; no other file spells the names
(``tests/test_architecture.py`` greps for them). A merged run (``embedkit merge``) is a run dir too.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from embedkit.errors import UserError
from embedkit.files import write_atomic

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
RUN_ID = "mlflow_run_id"
STEP_GLOB = "step-*.ckpt"
LOCK = ".lock"
B3_PARTITION = "b3_partition.json"
LINEAGE = "lineage.json"


def eval_folder(tag: str | None = None) -> str:
    """The name of an evaluation's folder: ``eval``, or ``eval-<tag>`` for a model cut to a depth."""
    return f"eval-{tag}" if tag else "eval"


class RunDir:
    """A run directory at ``path`` (it need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- the layout ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        """Where the newest checkpoint is linked (``checkpoints/last.ckpt``), whether or not it exists."""
        return self.checkpoints_dir / LAST

    @property
    def run_id_path(self) -> Path:
        return self.path / RUN_ID

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK

    @property
    def b3_partition_path(self) -> Path:
        """``b3_partition.json``: the B3 clusters this run draws its batches from (a resume reads it back)."""
        return self.path / B3_PARTITION

    @property
    def lineage_path(self) -> Path:
        """``lineage.json``: where this run's weights came from (``tracking/lineage.py``)."""
        return self.path / LINEAGE

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{int(step):08d}.ckpt"

    def eval_dir(self, tag: str | None = None) -> Path:
        """``eval/`` for the full model, ``eval-<tag>/`` for a model cut to a depth (tag ``l<L>_d<D>``)."""
        return self.path / eval_folder(tag)

    # --- what is there --------------------------------------------------------------------------
    def is_run(self) -> bool:
        """A run dir holds its config (written before the first step)."""
        return self.config_path.is_file()

    def has_checkpoint(self) -> bool:
        return self.newest_checkpoint() is not None

    def step_checkpoints(self) -> list[Path]:
        """The ``step-N.ckpt`` files, oldest first (names are zero-padded, so by name is by step)."""
        return sorted(self.checkpoints_dir.glob(STEP_GLOB))

    def newest_checkpoint(self) -> Path | None:
        """``last.ckpt`` where present, else the newest step file, else None."""
        if self.last_checkpoint.is_file():
            return self.last_checkpoint
        steps = self.step_checkpoints()
        return steps[-1] if steps else None

    def newest_good_checkpoint(self, warn: Callable[[str], None] | None = None, what: str = "resume") -> Path | None:
        """The newest checkpoint that reads (``last.ckpt``, then the step files newest first), None when
        there is none; one ``warn`` line naming the unreadable ones passed over (a copy cut short, a full
        disk), a one-line ``UserError`` when none reads."""
        warn = warn or _to_stderr
        names: dict[tuple[int, int], list[str]] = {}  # a file and its other names (last.ckpt: a hard link)
        problems: dict[tuple[int, int], str] = {}
        candidates = [self.last_checkpoint] if self.last_checkpoint.is_file() else []
        for path in [*candidates, *reversed(self.step_checkpoints())]:
            try:
                st = path.stat()
            except FileNotFoundError:  # pruned since listed (a run writing here: the lock will say so)
                continue
            key = (st.st_dev, st.st_ino)
            if key in names:
                names[key].append(path.name)
                continue
            names[key] = [str(path)]
            problem = checkpoint_problem(path)
            if problem is None:
                if problems:
                    warn(f"warning: passing over unreadable checkpoint {_named(names, problems)}; resuming from {path}")
                return path
            problems[key] = problem
        if problems:
            raise UserError(f"{what}={self.path}: no readable checkpoint under {self.checkpoints_dir} "
                            f"({_named(names, problems)})")
        return None

    def checkpoint(self, what: str = "model") -> Path:
        """The newest checkpoint, or a one-line ``UserError`` (``what`` names the option)."""
        ckpt = self.newest_checkpoint()
        if ckpt is None:
            raise UserError(f"{what}: {self.path} is not a run dir with a checkpoint (no {CHECKPOINTS}/{LAST})")
        return ckpt

    def saved_config(self, what: str = "resume") -> dict:
        import yaml

        if not self.config_path.is_file():
            raise UserError(f"{what}={self.path}: no {CONFIG} there (not an embedkit run directory)")
        return yaml.safe_load(self.config_path.read_text())

    def mlflow_run_id(self) -> str | None:
        return self.run_id_path.read_text().strip() if self.run_id_path.is_file() else None

    # --- writing --------------------------------------------------------------------------------
    def write_config(self, text: str) -> Path:
        write_atomic(self.config_path, text)
        return self.config_path

    def write_mlflow_run_id(self, run_id: str) -> None:
        write_atomic(self.run_id_path, run_id + "\n")

    # --- one writer per run dir ------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, warn: Callable[[str], None] | None = None):
        """Hold ``<run>/.lock`` inside the block (the run dir is created): a one-line ``UserError`` naming
        the holder's pid and host while another process holds it. The lock is an ``flock`` on the file, so
        the kernel frees it when its holder dies however it dies; a lock file left by a dead holder is
        taken over with one ``warn`` line. Released (the file removed) on leaving the block, errors too."""
        warn = warn or _to_stderr
        self.path.mkdir(parents=True, exist_ok=True)
        fd, stale = self._acquire_lock(warn)
        _HELD.add(fd)
        owner = os.getpid()
        try:
            if stale:
                warn(f"warning: taking over the lock of {self.path} left by {stale}, which is no longer running")
            os.ftruncate(fd, 0)
            os.write(fd, f"{owner} {socket.gethostname()}\n".encode())
            yield self
        finally:
            if os.getpid() == owner:  # not a forked child leaving the block
                _HELD.discard(fd)
                with contextlib.suppress(FileNotFoundError):  # a run that failed early removes its whole dir
                    if os.fstat(fd).st_ino == self.lock_path.stat().st_ino:
                        self.lock_path.unlink()
                os.close(fd)  # frees the flock

    def _acquire_lock(self, warn: Callable[[str], None]) -> tuple[int, str]:
        """(an open fd holding the flock on the lock file, the holder a stale file names or "")."""
        import fcntl

        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if not isinstance(e, BlockingIOError):  # a file system without locks (some cluster mounts)
                    warn(f"warning: {self.lock_path}: cannot lock ({e.strerror}); nothing stops a second fit here")
                    return fd, ""
                holder = _busy_holder(fd)
                os.close(fd)
                raise UserError(f"run.dir: {self.path} is in use by another embedkit fit ({holder}); "
                                f"wait for it or choose another run.dir") from None
            try:
                same = os.fstat(fd).st_ino == self.lock_path.stat().st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its last holder unlinked after we opened it
                return fd, _lock_holder(fd)
            os.close(fd)

    # --- from a checkpoint path -----------------------------------------------------------------
    @classmethod
    def of_checkpoint(cls, ckpt: str | Path) -> "RunDir | None":
        """The run dir a checkpoint file sits in (``<run>/checkpoints/<file>``), or None when it sits elsewhere."""
        ckpt = Path(ckpt).expanduser().resolve()
        if ckpt.parent.name != CHECKPOINTS:
            return None
        return cls(ckpt.parent.parent)


#: the lock files this process holds open. A forked child (a data loader worker) closes its copies at
#: once: an flock belongs to the open file, so a worker outliving its killed parent would hold it on.
_HELD: set[int] = set()


def _close_held_locks() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)  # this copy only: the parent's lock stands
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_locks)


def _named(names: dict, problems: dict) -> str:
    """"<file> (= <its other names>): <problem>; ..." for the unreadable checkpoint files."""
    return "; ".join(names[k][0] + (f" (= {', '.join(names[k][1:])})" if len(names[k]) > 1 else "") + f": {problem}"
                     for k, problem in problems.items())


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _lock_holder(fd: int) -> str:
    """"pid P on host H" from an open lock file, "" for an empty one (released)."""
    text = os.pread(fd, 4096, 0).decode(errors="replace").split()
    return f"pid {text[0]} on host {text[1] if len(text) > 1 else '?'}" if text else ""


def _busy_holder(fd: int) -> str:
    """The holder of a lock someone holds; a process forked from it (a data loader worker) keeps the
    flock until it exits too, so a holder gone from this host is said to be gone."""
    text = os.pread(fd, 4096, 0).decode(errors="replace").split()
    holder = _lock_holder(fd) or "a process that has not yet written its pid"
    if len(text) > 1 and text[1] == socket.gethostname() and text[0].isdigit() and not _alive(int(text[0])):
        holder += ", which exited; a process it started still holds the lock"
    return holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable checkpoint, or None. Cheap: the zip's central directory (at the end,
    so a cut file has none), every member inside the file, and the small pickle read (its CRC checked);
    the tensor bytes are not read."""
    import zipfile

    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if any(i.header_offset + i.compress_size > size for i in infos):
                return "truncated"
            pickles = [i for i in infos if i.filename.endswith("data.pkl")]
            if not pickles:
                return "no data.pkl: not a torch checkpoint"
            zf.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"truncated or corrupt: {e}"
    return None
