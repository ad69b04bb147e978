"""Experiment tracking and progress output, on the quickstart (made small) run twice through
`raykd run` (the first run fails one unit mid-way; the second resumes it): MLflow's store and
TensorBoard's event files are read back with their own readers, for every kind of unit."""
import json
import re

import pytest

from raykd.outputs.results import read_results


def unit_rows(tracked_run):
    """The results rows of each unit (DIH heads and stitched students have several)."""
    rows = read_results(tracked_run.run_dir)
    return {unit: part for unit, part in rows.groupby("unit")}


def test_progress_lines_are_plain_text_with_eta_and_a_summary(tracked_run):
    first, second = tracked_run.first, tracked_run.second
    assert first.returncode == 2 and "1 of 22 runs failed: seed0-kd" in first.stderr
    assert second.returncode == 0, second.stderr[-2000:]
    for out in (first.stdout + first.stderr, second.stdout + second.stderr):
        assert "\x1b" not in out, "no colour or cursor codes: the output is piped to a file"
        assert not any(ord(c) < 32 and c not in "\n\t" for c in out)
    log = second.stdout + second.stderr
    # a live line per unit epoch: epoch i/n, loss, val accuracy, ETA
    assert re.search(r"\[seed0-kd\] resuming after epoch 2", log)
    assert re.search(r"\[seed0-kd\] epoch 3/3  loss [\d.]+ \(ce [\d.]+  kd [\d.]+\)  "
                     r"val_top1 [\d.]+  [\d.]+s  eta 0s", log)
    assert re.search(r"\[seed1-cd_gkd\] epoch \d/3 .* eta \d+s", first.stderr)
    # where the job stands, after the run: 21 units finished before, seed0-kd now
    assert "units: 22 done, 0 training, 0 waiting" in log
    assert "units: 21 done, 0 training, 0 waiting, 1 failed" in first.stderr
    assert "Requesting resources" not in log, "Train's controller INFO lines are quiet"
    for m in re.finditer(r"units: (\d+) done, (\d+) training, (-?\d+) waiting",
                         first.stderr + log):
        assert int(m.group(3)) >= 0 and int(m.group(1)) + int(m.group(2)) <= 22, m.group(0)


def test_the_interrupted_unit_resumed_and_finished_units_were_kept(tracked_run):
    units = unit_rows(tracked_run)
    assert len(units) == 22
    kd = units["seed0-kd"].iloc[0]
    assert kd.resumed_from == 2 and kd.epochs == 3
    assert all((rows.resumed_from == 0).all() for u, rows in units.items() if u != "seed0-kd")
    # rows written by the first run were not rewritten by the second
    first_finished = [m.group(1) for m in re.finditer(r"raykd: \[\d+/22\] (\S+):",
                                                       tracked_run.first.stderr)]
    assert sorted(first_finished) == sorted(u for u in units if u != "seed0-kd")
    # each epoch says how many torch threads trained it: its own CPU, or both of the session's
    # two when the other lane was idle (ray.lend_idle_cpus)
    for history in (tracked_run.run_dir / "metrics").glob("*.jsonl"):
        threads = {json.loads(line)["threads"] for line in history.read_text().splitlines()}
        assert threads and threads <= {1, 2}, (history.name, threads)
    assert max(units[u].finished_at.max() for u in first_finished) < kd.finished_at
    assert "21 of 22 runs already finished" in tracked_run.second.stderr


@pytest.fixture(scope="module")
def mlflow_runs(tracked_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tracked_run.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return client, {r.data.tags["raykd.unit"]: r for r in runs}


def test_mlflow_holds_each_units_epochs_once_across_the_resume(tracked_run, mlflow_runs):
    client, runs = mlflow_runs
    parent = runs.pop("")
    units = unit_rows(tracked_run)
    assert sorted(runs) == sorted(units), "one run per unit, under one parent, after two drivers"
    for key, run in runs.items():
        rows = units[key]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]
        assert steps == list(range(1, int(rows.epochs.max()) + 1)), f"{key}: every epoch once"
        # the final row; a unit with several rows (heads, a stitched student before and after
        # its fine-tuning) has each under its method's name
        for row in rows.itertuples():
            name = "final/test_top1" if len(rows) == 1 else f"final/{row.method}/test_top1"
            assert run.data.metrics[name] == pytest.approx(row.test_top1), (key, name)
    kd = runs["seed0-kd"].data
    assert kd.params["params.temperature"] == "2.5" and kd.params["train.lr"] == "0.05"
    assert kd.tags["raykd.label"] == "kd" and kd.tags["raykd.seed"] == "0"
    assert "final/latency_ms" in kd.metrics, "students' rows carry their CPU latency"
    assert {"loss_ce", "loss_kd", "val_top1", "lr"} <= set(kd.metrics)


def test_tensorboard_events_hold_each_units_curves_once(tracked_run):
    root = tracked_run.run_dir / "tensorboard"
    units = unit_rows(tracked_run)
    assert sorted(p.name for p in root.iterdir()) == sorted(units)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for key, rows in units.items():
        acc = EventAccumulator(str(root / key))
        acc.Reload()
        assert [e.step for e in acc.Scalars("loss")] == list(range(1, int(rows.epochs.max()) + 1))
        assert any(t.startswith("final/") for t in acc.Tags()["scalars"]), key
    acc = EventAccumulator(str(root / "seed0-cd_gkd"))
    acc.Reload()
    w_cd = [e.value for e in acc.Scalars("w_cd")]
    assert w_cd[0] > w_cd[-1] > 0, "Early Decay Teacher: the channel term's weight decays"


def test_tracking_settings_are_checked_and_a_server_that_is_down_does_not_stop_a_job(
        tmp_path, caplog):
    from raykd.errors import RaykdError
    from raykd.job.config import job_from_dict
    from raykd.outputs.tracking import sinks_for

    with pytest.raises(RaykdError, match="tracking.mlflow: expected a tracking URI"):
        job_from_dict({"tracking": {"mlflow": 5}})
    assert job_from_dict({"tracking": {"mlflow": False}}).tracking.mlflow is None
    assert sinks_for(job_from_dict({"output_dir": str(tmp_path)})) == [], "no tracking asked"
    spec = job_from_dict({"output_dir": str(tmp_path), "tracking": {
        "mlflow": "http://127.0.0.1:9", "tensorboard": True}})
    with caplog.at_level("WARNING", logger="raykd"):
        sinks = sinks_for(spec)
    assert [type(s).__name__ for s in sinks] == ["TensorBoardSink"]
    assert "tracking.mlflow: http://127.0.0.1:9 unreachable" in caplog.text
