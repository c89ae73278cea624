"""``RunDir``: the one owner of a run directory's layout. Paths and YAML only (the ground floor).

    <run>/config.yaml                 the resolved config the run trained with
    <run>/checkpoints/step-NNNNNNNN.ckpt, last.ckpt   (last.ckpt: a link to the newest step file)
    <run>/mlflow_run_id               the MLflow run the run logs to (so a resume continues it)
    <run>/eval/, <run>/eval-l<L>_d<D>/   evaluation outputs (the full model; a model cut to a depth)

Every verb and library module reaches these through this class; no other file spells the names
(``tests/test_architecture.py`` greps for them). A merged run (``embedkit merge``) is a run dir too.
"""

from __future__ import annotations

from pathlib import Path

from embedkit.errors import UserError
from embedkit.files import write_atomic

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
RUN_ID = "mlflow_run_id"
STEP_GLOB = "step-*.ckpt"


class RunDir:
    """A run directory at ``path`` (it need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

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

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{int(step):08d}.ckpt"

    def eval_dir(self, tag: str | None = None) -> Path:
        """``eval/`` for the full model, ``eval-<tag>/`` for a model cut to a depth (tag ``l<L>_d<D>``)."""
        return self.path / (f"eval-{tag}" if tag else "eval")

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

    # --- from a checkpoint path -----------------------------------------------------------------
    @classmethod
    def of_checkpoint(cls, ckpt: str | Path) -> "RunDir | None":
        """The run dir a checkpoint file sits in (``<run>/checkpoints/<file>``), or None when it sits elsewhere."""
        ckpt = Path(ckpt).expanduser().resolve()
        if ckpt.parent.name != CHECKPOINTS:
            return None
        return cls(ckpt.parent.parent)
