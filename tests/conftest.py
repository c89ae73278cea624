import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the suite writes its own stores: never to a tracking server named by the caller's environment
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """Demo data drawn by tests goes to a per-session cache, never the user's."""
    path = tmp_path_factory.mktemp("embedkit-cache")
    os.environ["EMBEDKIT_CACHE"] = str(path)
    return path


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e/ launches processes: marked ``slow`` (still part of the default suite)."""
    for item in items:
        if "e2e" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.slow)
