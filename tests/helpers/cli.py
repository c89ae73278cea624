"""Running this checkout's CLI in a subprocess: the environment, the call, and the small demo's overrides."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli_env(**extra) -> dict:
    """Environment for a CLI subprocess that runs this checkout's code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({"CI": "true", "OMP_NUM_THREADS": "1", **extra})
    return env


def run_cli(args, cwd, **env):
    import subprocess

    return subprocess.run([sys.executable, "-m", "embedkit", *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=600)


SMALL_DEMO = ["data.demo.train_size=256", "data.demo.val_size=16", "data.demo.holdout_combinations=4",
              "data.train.shuffle_buffer=16", "data.train.num_workers=0"]
