"""Terminal detection: bars and carriage returns on an interactive terminal, plain lines elsewhere."""

from __future__ import annotations

import os
import sys


def interactive() -> bool:
    """Whether stderr is a terminal a person watches (not a pipe, a log file or CI)."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress_mode(setting: str) -> str:
    """``trainer.progress``: ``auto`` is a bar on a terminal and log lines elsewhere."""
    if setting != "auto":
        return setting
    return "bar" if interactive() else "log"
