"""docker/: what `make lint` cannot see. The compose stack publishes only on loopback and sends the
trainer's runs to its mlflow service; the Kubernetes and SLURM launches pass overrides the config
accepts; the docs name files that exist. (hadolint, `compose config -q` and the compose-spec schema
run in `make lint`.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
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


def _srun_fit(script: str, env: dict[str, str], user_args: list[str]) -> list[str]:
    """The ``embedkit fit`` overrides of a batch script's ``srun`` line, its variables filled in."""
    joined = script.replace("\\\n", " ")
    (line,) = [ln for ln in joined.splitlines() if re.match(r"\s*srun ", ln)]
    line = line.split("||")[0].replace('"$@"', " ".join(map(shlex.quote, user_args)))
    line = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], line)
    return _fit_overrides(shlex.split(line))


def _readme_slurm_script() -> str:
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("    #!/bin/bash")
    block = []
    for ln in lines[start:]:
        if not ln.startswith("    "):
            break
        block.append(ln[4:])
    return "\n".join(block)


@pytest.mark.parametrize("which", ["docker/slurm/train.sbatch", "README.md"])
def test_slurm_scripts_requeue_on_a_stop_and_resume_the_same_run(which):
    """Both SLURM scripts (the image's and the README's) ask for the signal and requeue, launch a fit
    the config accepts with ``run.resume=auto`` in a run dir that survives the requeue, stop on
    SIGUSR1 and requeue themselves on exit 138 (SIGUSR1) and 143 (SIGTERM)."""
    text = (REPO / which).read_text() if which != "README.md" else _readme_slurm_script()
    assert re.search(r"^#SBATCH .*--signal=SIGUSR1@90", text, re.M) and re.search(r"^#SBATCH .*--requeue", text, re.M)
    env = {"RUN_NAME": "embedkit-1234", "RUN_DIR": "runs/embedkit-1234", "RUN": "runs/llave7b",
           "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NUM_NODES": "4", "SIF": "embedkit.sif"}
    user = ["recipe=llave_7b", "data.train.shards=s3://bucket/mmeb/train/"]
    overrides = _srun_fit(text, env, user if which != "README.md" else [])
    cfg = compose(overrides)
    assert cfg["run"]["resume"] == "auto" and cfg["trainer"]["stop_signal"] == "SIGUSR1"
    assert cfg["run"]["dir"] in ("runs/embedkit-1234", "runs/llave7b")  # not a per-launch timestamped name
    assert cfg["trainer"]["num_nodes"] > 1 and cfg["trainer"]["devices"] == 8
    assert "|| code=$?" in text.replace("\\\n", " ")  # a stopped run's status reaches the requeue test
    (test,) = [ln for ln in text.splitlines() if "-eq 138" in ln]
    assert "-eq 143" in test and ("scontrol requeue" in test or "scontrol requeue" in text.split(test)[1][:80])
    assert not re.search(r"^\s*#\s*RESUME=", text, re.M)  # the old commented-out resume line is gone


def test_docs_name_files_that_exist():
    text = (REPO / "docs" / "clusters.md").read_text() + (REPO / "README.md").read_text()
    for path in set(re.findall(r"`(docker/[\w./-]+)`", text)):
        assert (REPO / path).exists(), path
