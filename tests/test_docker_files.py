"""docker/: what `make lint` cannot see. The compose stack publishes only on loopback and sends the
trainer's runs to its mlflow service; the Kubernetes and SLURM launches pass overrides the config
accepts; the docs name files that exist. (hadolint, `compose config -q` and the compose-spec schema
run in `make lint`.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from embedkit.config.loader import compose

REPO = Path(__file__).resolve().parents[1]


def test_compose_stack():
    stack = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = stack["services"]
    published = [(name, p) for name, s in services.items() for p in s.get("ports", [])]
    assert published == [("mlflow", "127.0.0.1:5000:5000")]  # the UI, on loopback only
    mlflow, train = services["mlflow"], services["train"]
    cmd = " ".join(mlflow["command"])
    assert "--serve-artifacts" in cmd and "--artifacts-destination=" in cmd and "sqlite:////mlflow/" in cmd
    assert "mlflow:5000" in re.search(r"--allowed-hosts=(\S+)", cmd).group(1).split(",")
    assert "/health" in " ".join(mlflow["healthcheck"]["test"])
    assert train["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert train["depends_on"]["mlflow"]["condition"] == "service_healthy"
    (gpu,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert train["shm_size"] and any(v.endswith(":/data/shards:ro") for v in train["volumes"])


def _fit_overrides(words: list[str]) -> list[str]:
    return [w for w in words[words.index("fit") + 1:] if "=" in w]


def test_kubernetes_job_overrides_are_valid():
    job = yaml.safe_load((REPO / "docker" / "k8s" / "pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob"
    specs = job["spec"]["pytorchReplicaSpecs"]
    containers = [specs[r]["template"]["spec"]["containers"][0] for r in ("Master", "Worker")]
    assert {c["name"] for c in containers} == {"pytorch"} and len({c["image"] for c in containers}) == 1
    words = shlex.split(containers[0]["args"][0].replace('"$WORLD_SIZE"', "2"))
    cfg = compose(_fit_overrides(words))
    assert cfg["trainer"]["num_nodes"] == 2 and cfg["data"]["train"]["shards"].startswith("s3://")


def test_slurm_script_asks_for_signal_and_requeue_and_marks_the_resume_line():
    text = (REPO / "docker" / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in text and "#SBATCH --requeue" in text
    assert re.search(r"^# RESUME=.*RESUME KEY", text, re.M)  # commented out until run resume lands
    compose(["recipe=llave_7b", "trainer.devices=8", "trainer.num_nodes=4", "run.name=x",
             "data.train.shards=s3://bucket/mmeb/train/"])


def test_docs_name_files_that_exist():
    text = (REPO / "docs" / "clusters.md").read_text() + (REPO / "README.md").read_text()
    for path in set(re.findall(r"`(docker/[\w./-]+)`", text)):
        assert (REPO / path).exists(), path
