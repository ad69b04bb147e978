"""`raykd sweep`: Ray Tune trials that are real Ray Train runs, ASHA, failures, resume, and
one-line errors before any trial starts."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raykd.errors import RaykdError
from raykd.job.config import job_from_dict, load_job
from raykd.sweep import check_sweep, run_sweep

from conftest import all_cpus_free, small_job

RAYKD = str(Path(sys.executable).parent / "raykd")
REPO = Path(__file__).resolve().parent.parent


def _sweep_job(tmp_path, name, space, **sweep):
    job = small_job(tmp_path, name=name, methods={"kd": {"temperature": 4, "alpha": 0.9}})
    job["sweep"] = {"method": "kd", "space": space, "num_samples": 1, "grace_period": 1,
                    "max_concurrent": 2, **sweep}
    return job


@pytest.mark.parametrize("change,message", [
    ({"sweep": None}, "the job has no `sweep:` section"),
    ({"sweep.method": "dih"}, "sweep.method: no methods entry 'dih'; the job has kd"),
    ({"sweep.space": {}}, "sweep.space: give at least one dimension"),
    ({"sweep.space": {"methods.kd.alpha": {"type": "choice", "values": []}}},
     "sweep.space.methods.kd.alpha: choice needs a non-empty `values` list"),
    ({"sweep.space": {"methods.kd.alpha": {"type": "uniform", "low": 0.9, "high": 0.1}}},
     "sweep.space.methods.kd.alpha: low (0.9) must be below high (0.1)"),
    ({"sweep.space": {"student.train.lr": {"type": "loguniform", "low": 0, "high": 0.1}}},
     "sweep.space.student.train.lr: loguniform needs low > 0, got 0"),
    ({"sweep.space": {"methods.kd.temp": {"type": "uniform", "low": 1, "high": 4}}},
     "unknown key methods.kd.temp; allowed under methods.kd: temperature"),
    ({"sweep.space": {"methods.kd.alpha": {"type": "uniform", "low": 0.5, "high": 1.5}}},
     "methods.kd.alpha must be in [0, 1], got 1.5"),
    ({"sweep.space": {"data.batch_size": {"type": "choice", "values": [32]}}},
     "sweep.space.data.batch_size: searchable keys start with methods.kd., student.train."),
    ({"sweep.metric": "test_top1"}, "sweep.metric: unknown 'test_top1'; allowed: val_top1"),
    ({"sweep.space": {"methods.kd.alpha": {"type": "normal"}}},
     "sweep.space.methods.kd.alpha.type: unknown 'normal'"),
    ({"sweep.space": {"methods.kd.alpha": {"low": 0.1}}},
     "sweep.space.methods.kd.alpha: missing type"),
    ({"sweep.seeds": [0, 1], "sweep.scheduler": "fifo"},
     "sweep.seeds: 1 is not one of the job's seeds [0]"),
    ({"sweep.seeds": [0], "sweep.seed": 0}, "give sweep.seed (one) or sweep.seeds (several)"),
    ({"sweep.seeds": [0, 0], "sweep.scheduler": "fifo"}, "sweep.seeds [0, 0] repeats a seed"),
])
def test_bad_sweeps_fail_before_any_trial(tmp_path, change, message):
    job = _sweep_job(tmp_path, "bad", {"methods.kd.temperature": {"type": "uniform", "low": 1,
                                                                   "high": 8}})
    for key, value in change.items():
        if key == "sweep":
            job.pop("sweep")
        else:
            job["sweep"][key.split(".", 1)[1]] = value
    with pytest.raises(RaykdError) as err:
        check_sweep(job, job_from_dict(job))
    assert message in str(err.value)


def test_several_seeds_need_a_scheduler_that_waits_for_them(tmp_path):
    job = _sweep_job(tmp_path, "seeds", {"methods.kd.alpha": {"type": "grid", "values": [0.5]}},
                     seeds=[0, 1])
    job["seeds"] = [0, 1]
    with pytest.raises(RaykdError, match="ASHA could not stop it early; set sweep.scheduler: "
                                         "fifo"):
        check_sweep(job, job_from_dict(job))


def test_a_sweep_over_several_seeds_scores_each_trial_by_their_mean(ray_session, tmp_path,
                                                                    digits_teacher):
    """`sweep.seeds`: each trial trains one run per seed as one pack, and Tune ranks it by
    the mean of their val_top1 (epoch by epoch), not by one seed's."""
    job = _sweep_job(tmp_path, "seeds", {"methods.kd.alpha": {"type": "grid", "values": [0.2,
                                                                                       0.9]}},
                     seeds=[0, 1], scheduler="fifo")
    job["seeds"] = [0, 1]
    job["teacher"] = {"model": "cnn", "checkpoint": str(digits_teacher)}
    job["student"]["train"]["epochs"] = 2
    table, results = run_sweep(job)
    assert len(table) == 2 and (table.status == "finished").all()
    trials = Path(job["output_dir"]) / "seeds" / "sweep" / "trials"
    for row in table.to_dict("records"):
        finals = [json.loads((trials / row["trial"] / f"seed{seed}" / "metrics.jsonl")
                             .read_text().splitlines()[-1])["val_top1"] for seed in (0, 1)]
        assert finals[0] != finals[1], "two seeds, two runs"
        assert row["last_val_top1"] == pytest.approx(sum(finals) / 2)
        assert row["last_val_top1_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)
    assert sorted(results[results.role == "student"].seed) == [0, 1], "the best, over the job"


def test_a_bad_sweep_is_one_line_from_the_command(tmp_path):
    job = _sweep_job(tmp_path, "cli", {"methods.kd.alpha": {"type": "choice", "values": []}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    res = subprocess.run([RAYKD, "sweep", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("raykd: error: sweep.space.methods")


def test_asha_sweep_stops_trials_records_failures_and_runs_the_best(ray_session, tmp_path,
                                                                    capsys):
    # lr 0.1 and 0.2 first (two at a time); the 1e-4 trial reaches epoch 1 far below them and
    # ASHA stops it; lr 0.05 is made to fail after its first epoch: the sweep goes on
    job = _sweep_job(tmp_path, "asha", {"student.train.lr": {
        "type": "grid", "values": [0.2, 0.1, 0.0001, 0.05]}}, reduction_factor=2)
    job["tracking"] = {"mlflow": True, "tensorboard": True}
    table, results = run_sweep(job, fail_when={"student.train.lr": 0.05})
    assert len(table) == 4
    status = dict(zip(table["student.train.lr"], table.status))
    assert status[0.05] == "failed"
    assert status[0.0001] == "stopped"   # ASHA: far below the others at epoch 1
    assert "finished" in (status[0.2], status[0.1])
    run_dir = Path(job["output_dir"]) / "asha"
    assert (run_dir / "sweep.parquet").is_file() and (run_dir / "sweep.png").stat().st_size > 1000
    # trials never read the test split
    for metrics in (run_dir / "sweep" / "trials").glob("*/metrics.jsonl"):
        assert all("test_top1" not in json.loads(line) for line in metrics.read_text().splitlines())
    # best.yaml is a job `raykd run` accepts, and it ran over the job's seeds
    best = load_job(run_dir / "best.yaml")
    assert best.sweep is None and list(best.methods) == ["kd"]
    assert status[best.student.train.lr] == "finished"
    kd = results[results.method == "kd"].iloc[0]
    assert 0 <= kd.test_top1 <= 1 and kd.role == "student"
    # `raykd results` shows the trials before the results table
    from raykd.cli import main
    assert main(["results", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.index("sweep trials") < out.index("test_top1") and "stopped" in out
    # every trial is tracked with its sampled value and each epoch it ran, once
    from mlflow.tracking import MlflowClient

    from raykd.outputs.report import build_report
    from raykd.outputs.tracking import read_scalars

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("asha")
    runs = {r.data.tags["raykd.unit"]: r for r in
            client.search_runs([experiment.experiment_id], max_results=100)}
    for trial in table.to_dict("records"):
        run = runs[f"trial-{trial['trial']}"]
        assert float(run.data.params["student.train.lr"]) == trial["student.train.lr"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_top1")]
        # each epoch the trial trained, once (a stopped trial may finish the epoch after the
        # one Tune stopped it on: its history has it, so the tracker does)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= trial["epochs"] >= 1
        if trial["last_val_top1"] == trial["last_val_top1"]:     # not NaN
            assert run.data.metrics["final/last_val_top1"] == pytest.approx(trial["last_val_top1"])
        tb_steps, _ = read_scalars(run_dir / "tensorboard" / f"trial-{trial['trial']}")
        assert max(tb_steps) == len(steps)
    assert "seed0-kd" in runs and "seed0-teacher" in runs, "the prerequisites and the best run"
    # the report shows the sweep's trials and plot
    page = build_report(run_dir)
    assert "<h2>Sweep</h2>" in page and "data:image/png;base64," in page


def test_the_readme_sweep_on_a_fresh_folder_stops_on_ctrl_c_and_resumes_to_the_end(
        ray_session, tmp_path):
    """`raykd sweep jobs/sweep_kd.yaml` as the README gives it, on a fresh output folder (so its
    teacher is trained first, in a run of its own) and made small by overrides; it joins the
    session's 2-CPU Ray as a driver of its own. Ctrl-C in the middle of the trials stops it at
    once, as it stops `raykd run`; the same command then resumes and finishes, without training
    a finished trial again."""
    overrides = ["output_dir=relative_out", "seeds=[0]", "data.dataset=digits",
                 "teacher.model=cnn", "teacher.train.epochs=2", "student.train.epochs=2",
                 "sweep.num_samples=2", "sweep.max_concurrent=1", "sweep.scheduler=fifo"]
    command = [RAYKD, "sweep", str(REPO / "jobs" / "sweep_kd.yaml"), *overrides]
    trials = tmp_path / "relative_out" / "sweep_kd" / "sweep" / "trials"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True, cwd=tmp_path, env=env)
    deadline = time.monotonic() + 240
    while not list(trials.glob("*/model.pt")) and time.monotonic() < deadline:
        time.sleep(0.5)
    os.kill(driver.pid, signal.SIGINT)
    try:
        _, err = driver.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.kill(driver.pid, signal.SIGUSR1)   # raykd dumps every thread's stack: where it hangs
        time.sleep(2)
        os.killpg(driver.pid, signal.SIGKILL)
        _, err = driver.communicate()
        raise AssertionError("Ctrl-C did not stop the sweep within 30 s; its stderr ends:\n"
                             + err[-6000:]) from None
    assert driver.returncode == 130, err[-2000:]
    # raykd's own last line; a line of Ray's from another process (prefixed "(Name pid=N)", such
    # as Train's placement-group cleaner seeing the trial's run end) may still arrive after it
    own = [line for line in err.strip().splitlines() if not line.startswith("(")]
    assert own[-1] == "raykd: interrupted; re-run the same command to resume", err[-2000:]
    finished = {p.parent.name: p.parent.joinpath("metrics.jsonl").read_text()
                for p in trials.glob("*/model.pt")}
    assert finished, "no trial finished before Ctrl-C"
    res = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=tmp_path,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    for trial, history in finished.items():   # not trained again: its history is unchanged
        assert (trials / trial / "metrics.jsonl").read_text() == history
    table = pd.read_parquet(tmp_path / "relative_out" / "sweep_kd" / "sweep.parquet")
    assert len(table) == 2 and (table.status == "finished").all()
    # nothing of either driver holds the session's CPUs (trials, their Train runs, PGs)
    assert all_cpus_free(ray_session), "something of the job still holds the session's CPUs"


def test_a_trial_exported_before_its_driver_died_is_reported_not_retrained(tmp_path):
    """The kill can land after a trial's export but before Tune records its end: the resumed
    trial then reports the exported model's last epoch instead of training it again."""
    from types import SimpleNamespace

    from raykd.sweep import finished_trial

    history, export = tmp_path / "metrics.jsonl", tmp_path / "model.pt"
    unit = SimpleNamespace(history_path=str(history), export_path=str(export),
                           optim=SimpleNamespace(epochs=2))
    assert finished_trial(unit) is None                       # nothing yet
    history.write_text(json.dumps({"epoch": 1, "val_top1": 0.5}) + "\n")
    export.write_bytes(b"model")
    assert finished_trial(unit) is None                       # an export without its last epoch
    with history.open("a") as f:
        f.write(json.dumps({"epoch": 2, "val_top1": 0.75}) + "\n")
    assert finished_trial(unit) == {"epoch": 2, "val_top1": 0.75}
    export.unlink()
    assert finished_trial(unit) is None                       # the last epoch, not yet exported


def test_optuna_search_is_built_and_refuses_grids():
    from optuna import __version__  # noqa: F401  (installed with raykd)
    from ray.tune.search.optuna import OptunaSearch

    from raykd.job.specs import SearchDim, SweepSpec
    from raykd.sweep import search_alg

    spec = SweepSpec(method="kd", search="optuna",
                     space={"methods.kd.alpha": SearchDim("uniform", 0.1, 0.9)})
    assert isinstance(search_alg(spec), OptunaSearch)
    spec.space["methods.kd.k"] = SearchDim("grid", values=[1, 2])
    with pytest.raises(RaykdError, match="optuna cannot take grid dimensions"):
        search_alg(spec)


@pytest.mark.parametrize("methods,key,dim,message", [
    ({"dih": {}}, "heads.train.lr", {"type": "choice", "values": [0.01, 0.1]},
     "sweep.space.heads.train.lr: changes what seed0-heads trains"),
    ({"nd": {"method": "neighbourhood", "groups": ["stage2"]}}, "methods.nd.candidates",
     {"type": "choice", "values": [["w0.5d1"], ["w1d1"]]},
     "sweep.space.methods.nd.candidates: changes what seed0-nd-stage2-"),
    ({"kd": {}}, "student.train.epochs", {"type": "choice", "values": [2, 4]},
     "sweep.space.student.train.epochs: epochs cannot be searched"),
    ({"dih": {}}, "methods.dih.temperature", {"type": "uniform", "low": 1, "high": 8}, None),
])
def test_keys_that_change_a_prerequisite_or_the_epochs_are_refused(tmp_path, methods, key, dim,
                                                                   message):
    """A sweep trains the tuned student's prerequisites once: a key that changes them would
    never take effect (and ASHA schedules on the job's epochs)."""
    from raykd.data import load_dataset
    from raykd.sweep import Shapes, check_prerequisites

    job = small_job(tmp_path, name="pre", methods=methods)
    job["sweep"] = {"method": next(iter(methods)), "space": {key: dim}}
    spec = job_from_dict(job)
    check_sweep(job, spec)
    splits = load_dataset(spec.data)
    shapes = Shapes(splits.num_classes, tuple(splits.input_shape))
    if message is None:
        check_prerequisites(job, spec, shapes)
        return
    with pytest.raises(RaykdError) as err:
        check_prerequisites(job, spec, shapes)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_sweep_resumed_with_a_changed_job_is_refused_naming_the_key(tmp_path):
    """A sweep's folder remembers the whole resolved job, not only its `sweep:` section: a
    resume with a changed method, data or model setting would mix trials of two jobs, and is
    one line naming the key; where it runs or how it is tracked may change."""
    from raykd.sweep import Sweep

    job = _sweep_job(tmp_path, "resumed", {"student.train.lr": {
        "type": "grid", "values": [0.1, 0.2]}})
    Sweep(copy.deepcopy(job)).check_folder()
    moved = copy.deepcopy(job)
    moved["ray"]["num_cpus"] = 2
    moved["tracking"] = {"tensorboard": True}
    Sweep(moved).check_folder()                 # not what a trial computes
    for key, value, message in (
            ("methods", {"kd": {"temperature": 4, "alpha": 0.5}}, "methods.kd.alpha was 0.9, "
                                                                   "now 0.5"),
            ("data", {"dataset": "digits", "batch_size": 32}, "data.batch_size was 64, now 32")):
        changed = copy.deepcopy(job)
        changed[key] = value
        with pytest.raises(RaykdError, match=message) as err:
            Sweep(changed).check_folder()
        assert "give the job a new name" in str(err.value)


@pytest.mark.parametrize("method,key", [("fitnets", "hint_fraction"), ("at", "beta"),
                                        ("rkd", "angle"), ("crd", "temperature"),
                                        ("dkd", "beta"), ("dist", "tau")])
def test_every_baseline_is_sweepable_by_its_own_parameters(tmp_path, method, key):
    """The sweep knows no method: a baseline's Params are its searchable keys, and a value its
    bounds refuse is the method's own one-line error."""
    job = small_job(tmp_path, name="s", methods={method: {}})
    job["sweep"] = {"method": method, "num_samples": 2, "space": {
        f"methods.{method}.{key}": {"type": "uniform", "low": 0.1, "high": 0.5}}}
    check_sweep(job, job_from_dict(copy.deepcopy(job)))
    job["sweep"]["space"] = {f"methods.{method}.{key}": {"type": "uniform", "low": -2,
                                                         "high": -1}}
    with pytest.raises(RaykdError, match=f"methods.{method}.{key}"):
        check_sweep(job, job_from_dict(copy.deepcopy(job)))


def test_asha_stopping_inside_an_edt_warmup_is_warned_in_one_line(tmp_path, caplog):
    """An Early Decay Teacher trains CD alone for its warm-up (30% of the run): ASHA comparing
    trials after one epoch of ten compares warm-ups; the sweep says so, naming the epochs."""
    import logging

    job = small_job(tmp_path, name="edt", methods={"cd": {"edt": True}})
    job["student"]["train"]["epochs"] = 10
    job["sweep"] = {"method": "cd", "grace_period": 1, "num_samples": 2, "space": {
        "methods.cd.warmup": {"type": "uniform", "low": 0.2, "high": 0.5}}}
    with caplog.at_level(logging.WARNING, logger="raykd"):
        check_sweep(job, job_from_dict(copy.deepcopy(job)))
    [line] = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert "up to 5.0 epochs" in line and "raise sweep.grace_period to 5" in line
    caplog.clear()
    job["sweep"]["grace_period"] = 5
    with caplog.at_level(logging.WARNING, logger="raykd"):
        check_sweep(job, job_from_dict(copy.deepcopy(job)))
    assert not [r for r in caplog.records if "warm-up" in r.getMessage()]
