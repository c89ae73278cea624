"""End to end: `embedkit fit` writes the run folder and a complete MLflow run (one process launch)."""

import pytest
import torch
import yaml

from tests.helpers.cli import SMALL_DEMO, run_cli


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    work = tmp_path_factory.mktemp("fit")
    run_dir = work / "X"
    args = ["fit", "recipe=demo", "trainer.max_steps=3", f"run.dir={run_dir}", "run.name=e2e",
            "train.global_batch_size=8", "train.chunk_size=4", *SMALL_DEMO]
    out = run_cli(args, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, run_dir, out, args


def test_run_folder_holds_config_and_checkpoint(fitted):
    work, run_dir, out, _ = fitted
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 3 and config["run"]["dir"] == str(run_dir)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert any(k.startswith("encoder.backbone.model.") for k in ckpt["state_dict"])
    assert not list(run_dir.rglob("*.tmp"))


def test_prints_before_and_after_and_plain_progress(fitted):
    _, _, out, _ = fitted
    text = out.stdout
    assert "held-out P@1" in text and "before" in text and "after" in text
    assert "step 3/3" in text  # CI (not a TTY): plain progress lines, no bar


def test_mlflow_run_has_params_tags_metrics_artifacts(fitted):
    import mlflow

    work, run_dir, _, args = fitted
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("demo")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    params = run.data.params
    assert params["trainer.max_steps"] == "3" and params["loss.name"] == "infonce"
    assert params["model.backbone.name"] == "qwen2_vl" and params["train.chunk_size"] == "4"
    tags = run.data.tags
    assert tags["recipe"] == "demo" and tags["embedkit_version"] and tags["git_sha"]
    for metric in ("train/loss", "train/lr", "val/p_at_1", "train/pad_fraction"):
        assert client.get_metric_history(run.info.run_id, metric), metric
    pad = [m.value for m in client.get_metric_history(run.info.run_id, "train/pad_fraction")]
    assert all(0.0 <= v < 1.0 for v in pad), pad
    val = client.get_metric_history(run.info.run_id, "val/p_at_1")
    assert len(val) == 2  # before training and after
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.txt"} <= artifacts
    overrides = client.download_artifacts(run.info.run_id, "overrides.txt", str(work))
    assert open(overrides).read().split() == args[2:]
