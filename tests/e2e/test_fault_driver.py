"""The fault driver's short seeded set (``bench/faults.py``, the same code as ``make faults``): a fit
interrupted five times, a SIGKILL before its first checkpoint (the resume starts it again in the same
MLflow run), a full disk at a checkpoint write (one line, the previous checkpoint intact,
the temporary gone), a SIGKILL inside validation, one after a training batch and one between a
checkpoint's write and its rename, each resumed with
``embedkit fit resume=RUN``, ends with the uninterrupted run's weights and one MLflow run holding its
whole metric history; an ``encode`` killed inside a part's write, re-run, writes the same bytes."""

from __future__ import annotations

from bench.faults import QUICK_FIT, FitFaults, draw_fault, encode_faults, history_problems, segments


def test_fit_and_encode_under_seeded_faults_end_as_the_uninterrupted_runs(tmp_path):
    fit = FitFaults(tmp_path / "fit", QUICK_FIT, log=lambda m: None)
    report = fit.run(kills=3, seed=1, enospc=True, early=True)
    assert report.ok, "\n".join(report.lines())
    # a kill before the first checkpoint, a full disk at a checkpoint write, then (seed 1) a kill inside the validation at step 20 (whose metric
    # a resume from that step's checkpoint never logged), one after a training batch, and one between a
    # checkpoint's write and its rename
    assert [f.plan.split(":")[0] for f in report.faults] == ["train_batch", "checkpoint_write", "validation_batch",
                                                            "train_batch", "checkpoint_write"]
    assert report.faults[4].notes and report.faults[4].notes[0].startswith("left .step-")
    assert report.faults[1].returncode == 2 and report.faults[1].notes == [
        "full disk: one line, previous checkpoint intact"]
    assert all(f.returncode == -9 for f in report.faults[:1] + report.faults[2:])
    assert report.max_weight_diff <= 1e-6

    report = encode_faults(tmp_path, fit.whole, kills=1, seed=0, log=lambda m: None)
    assert report.ok and len(report.faults) == 1, "\n".join(report.lines())


def test_the_checks_can_fail(tmp_path):
    """A history with a missing step, a changed value and a second run is refused; a draw counts its
    reaches from the process's own first one."""
    import mlflow

    def store(name, runs):
        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / name}")
        exp = client.create_experiment("x")
        for points in runs:
            run = client.create_run(exp)
            for step, value in points.items():
                client.log_metric(run.info.run_id, "train/loss", value, step=step)
        return tmp_path / name

    ref = store("ref.db", [{1: 1.0, 2: 0.5}])
    assert history_problems(ref, store("cut.db", [{1: 0.75}])) == [
        "train/loss at step 1: [0.75], the reference logged 1.0", "train/loss at step 2: missing"]
    assert history_problems(ref, store("two.db", [{}, {1: 1.0, 2: 0.5, 3: 0.1}])) == [
        "2 MLflow runs, expected one", "train/loss at step 3: logged, not in the reference"]

    import random

    trace = ["validation_batch", "train_batch", "checkpoint_write", "train_batch", "validation_batch",
             "checkpoint_write", "train_batch", "checkpoint_write"]
    stretch = segments(trace, 1)[0]
    assert stretch == range(3, 8)
    # resumed from step 1: its reaches start at the second training batch
    assert draw_fault(random.Random(0), trace, 1, stretch, "checkpoint_write", ()) in (
        "checkpoint_write:1", "checkpoint_write:2")
    assert draw_fault(random.Random(0), trace, 1, stretch, "validation_batch", ()) == "validation_batch:1"
    assert draw_fault(random.Random(0), trace, 0, stretch, "validation_batch", ()) == "validation_batch:2"
