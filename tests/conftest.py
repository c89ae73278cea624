import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite writes its own stores: never to a tracking server named by the caller's environment
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """Demo data drawn by tests goes to a per-session cache, never the user's."""
    path = tmp_path_factory.mktemp("embedkit-cache")
    os.environ["EMBEDKIT_CACHE"] = str(path)
    return path


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
