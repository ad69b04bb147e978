"""End to end on a real local Ray: teacher, CE and KD students as real TorchTrainer runs; runs
that cannot be placed, and finished runs that do not let go of their CPUs."""
import time

import pandas as pd
import pytest
import ray

from raykd.cli import main
from raykd.data import load_dataset
from raykd.driver.pipeline import run_job, wait_for_room
from raykd.driver.plan import plan_units
from raykd.errors import RaykdError, one_line
from raykd.files import file_hash
from raykd.job.config import job_from_dict
from raykd.models import count_params
from raykd.models.export import load_export
from raykd.outputs.results import REQUIRED_COLUMNS, read_results

from conftest import all_cpus_free, small_job


def test_end_to_end_on_digits_then_reuse(ray_session, tmp_path, capsys):
    spec = job_from_dict(small_job(tmp_path))
    df = run_job(spec)
    assert set(REQUIRED_COLUMNS) <= set(df.columns)
    assert sorted(zip(df.role, df.method)) == [("student", "ce"), ("student", "kd"), ("teacher", "ce")]
    assert df.val_top1.between(0, 1).all() and df.test_top1.between(0, 1).all()
    assert (df.epochs == 3).all()
    teacher = df[df.role == "teacher"].iloc[0]
    assert teacher.test_top1 > 0.8, "a 3-epoch CNN on digits is far above chance (0.1)"
    students = df[df.role == "student"]
    assert students.params.nunique() == 1 and students.params.iloc[0] < teacher.params
    for row in df.itertuples():   # counted on the trained, exported model
        assert row.params == count_params(load_export(row.export))
    # the results file holds the same rows; per-epoch histories carry each named loss
    assert len(read_results(spec.run_dir)) == 3
    history = pd.read_parquet(spec.run_dir / "metrics" / "seed0-kd.parquet")
    assert {"loss_ce", "loss_kd", "val_top1"} <= set(history.columns) and len(history) >= 1
    # a second run of the same job finds every run finished and trains nothing
    again = run_job(spec)
    assert sorted(again.wall_s) == sorted(df.wall_s)
    # a re-run with one method's settings changed trains that unit again, from the start (not
    # from its old checkpoint), and keeps the others
    changed = run_job(job_from_dict(small_job(tmp_path, methods={
        "ce": {}, "kd": {"temperature": 2, "alpha": 0.9}}))).set_index("unit")
    before = df.set_index("unit")
    for key in ("seed0-teacher", "seed0-ce"):
        assert changed.loc[key, "wall_s"] == before.loc[key, "wall_s"], key
    assert changed.loc["seed0-kd", "settings"] != before.loc["seed0-kd", "settings"]
    assert changed.loc["seed0-kd", "resumed_from"] == 0 and changed.loc["seed0-kd", "epochs"] == 3
    assert (spec.run_dir / "metrics" / "seed0-kd.replaced.jsonl").is_file()
    # `raykd results` prints mean ± std per method and draws the plot
    capsys.readouterr()
    assert main(["results", str(spec.run_dir), "--plot", str(tmp_path / "acc.png")]) == 0
    out = capsys.readouterr().out
    assert "±" in out and "teacher" in out and "kd" in out
    assert (tmp_path / "acc.png").stat().st_size > 1000
    # another job in the same output folder asking for the same teacher takes it from the store
    other = run_job(job_from_dict(small_job(tmp_path, name="t2", methods={"ce": {}})))
    shared = other[other.role == "teacher"].iloc[0]
    assert shared.reused_from.startswith(str(tmp_path / "teachers"))
    assert file_hash(shared.export) == file_hash(teacher.export)
    assert shared.test_top1 == teacher.test_top1
    assert not (tmp_path / "t2" / "metrics" / "seed0-teacher.parquet").exists(), "not trained"


def test_data_parallel_run_with_two_workers(ray_session, tmp_path):
    spec = job_from_dict(small_job(tmp_path, name="ddp", methods={"kd": {}},
                                   ray={"workers": 2, "max_failures": 0}))
    df = run_job(spec)
    history = pd.read_parquet(spec.run_dir / "metrics" / "seed0-kd.parquet")
    # each of the two workers saw half the training set (sharded, not each the whole of it);
    # together they cover it once per epoch (1,097 images, padded to an even 1,098)
    assert (history.worker_images == 549).all() and (history.train_images == 1098).all()
    assert df[df.role == "teacher"].iloc[0].test_top1 > 0.8
    # the reported accuracies are the exported model's (rank 0's, BatchNorm statistics too),
    # though each worker scored its own half of the split
    from raykd.data import load_dataset
    from raykd.train.batches import evaluate

    splits = load_dataset(spec.data)
    for row in df.itertuples():
        exported = load_export(row.export)
        assert row.val_top1 == evaluate(exported, splits.val, 64, "cpu"), row.unit
        assert row.test_top1 == evaluate(exported, splits.test, 64, "cpu"), row.unit


def test_actor_served_and_cached_teachers_train_the_same_student_as_local(ray_session, tmp_path):
    import torch

    from raykd.models import build_model
    from raykd.models.export import save_export

    torch.manual_seed(3)
    teacher_path = tmp_path / "teacher.pt"
    save_export(build_model("cnn", 10, 1, 8), teacher_path, 10, 1, 8)

    def kd_losses(name, **teacher):
        job = small_job(tmp_path, name=name, methods={"kd": {}},
                        teacher={"model": "cnn", "checkpoint": str(teacher_path), **teacher})
        spec = job_from_dict(job)
        df = run_job(spec)
        assert list(df.role) == ["student"]
        return pd.read_parquet(spec.run_dir / "metrics" / "seed0-kd.parquet").loss_kd.to_numpy()

    local = kd_losses("local", placement="local", cache=False)
    served = kd_losses("served", placement="actors", shards=2, cpus_per_shard=0.5, cache=False)
    cached = kd_losses("cached", placement="actors", shards=2, cpus_per_shard=0.5, cache=True)
    assert (tmp_path / "feature_cache").is_dir()
    assert abs(served - local).max() < 1e-5 * abs(local).max()
    assert abs(cached - local).max() < 1e-3 * abs(local).max()


@ray.remote(num_cpus=1)
def _stuck_teardown() -> None:
    """A finished run whose teardown never ends, holding a CPU (a Train controller that does
    not exit keeps its workers' placement group)."""
    time.sleep(3600)


def test_a_finished_run_stuck_in_teardown_is_stopped_before_new_runs_start(ray_session):
    from raykd.driver import pipeline

    stuck = _stuck_teardown.remote()
    while ray_session.available_resources().get("CPU", 0) >= 2:   # it holds its CPU
        time.sleep(0.1)
    pipeline._TEARDOWNS.append(stuck)
    started = time.monotonic()
    pipeline.release_finished_runs(bound_s=2)
    assert time.monotonic() - started < 10, "bounded: never waits for the stuck run"
    assert all_cpus_free(ray_session, 30)
    pipeline.wait_for_room({"CPU": 2}, "the sweep's first trial", bound_s=5)   # returns


def test_what_cannot_be_placed_fails_in_one_line_naming_what_it_waits_for(ray_session, tmp_path,
                                                                         monkeypatch):
    """Both CPUs held by a placement group nothing removes: the sweep's wait for room, and a
    Train run itself (after its placement timeout, `ray.placement_timeout_s`, however short),
    each end in one line."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from raykd.train.runner import START_TIMEOUT, RunSettings, fit_units, placement_steps

    holder = placement_group([{"CPU": 2}])
    ray_session.get(holder.ready(), timeout=60)
    try:
        with pytest.raises(RaykdError) as err:
            wait_for_room({"CPU": 1}, "the sweep's first trial", bound_s=1)
        message = str(err.value)
        assert "\n" not in message
        assert "the sweep's first trial needs {'CPU': 1}" in message
        assert "CPU: 0 of 2 free" in message and "1 placement groups hold resources" in message
        spec = job_from_dict(small_job(tmp_path, methods={"ce": {}}))
        [teacher] = [u for u in plan_units(spec, load_dataset(spec.data)) if u.role == "teacher"]
        started = time.monotonic()
        outcome = ray_session.get(fit_units.remote([teacher], RunSettings(
            str(tmp_path / "ray"), 10, (1, 8, 8), max_failures=0, placement_timeout_s=1)))
        reason = one_line(outcome[teacher.key])
        assert reason == ("no room for the run's 1 worker(s) ({'CPU': 1.0} each) within the "
                          "placement timeout (ray.placement_timeout_s); the cluster has "
                          "{'CPU': 0.0} free"), reason
        # its own 1 s, not one of Train's 60 s attempts
        assert time.monotonic() - started < 15
        # a job's placement timeout is cut into equal attempts no longer than Train's 60 s
        monkeypatch.delenv(START_TIMEOUT, raising=False)
        assert [placement_steps(t) for t in (600, 90, 30)] == [(10, 60.0), (2, 45.0), (1, 30.0)]
    finally:
        remove_placement_group(holder)
    assert all_cpus_free(ray_session, 30)


def test_a_unit_resumed_after_its_last_epoch_says_so_in_its_row(ray_session, tmp_path):
    """Its driver died after the last checkpoint, before the row: the re-run trains nothing,
    logs "resuming after epoch 3", and its row says resumed_from 3 (not 0)."""
    from raykd.train.runner import RunSettings, fit_units

    spec = job_from_dict(small_job(tmp_path, methods={"ce": {}}))
    [teacher] = [u for u in plan_units(spec, load_dataset(spec.data)) if u.role == "teacher"]
    settings = RunSettings(str(tmp_path / "ray"), 10, (1, 8, 8), max_failures=0)
    [first] = ray_session.get(fit_units.remote([teacher], settings))[teacher.key]
    [again] = ray_session.get(fit_units.remote([teacher], settings))[teacher.key]
    assert first["resumed_from"] == 0 and again["resumed_from"] == 3
    assert again["epochs"] == 3 and again["val_top1"] == first["val_top1"]
