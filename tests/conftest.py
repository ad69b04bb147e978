"""One real local Ray instance for the whole test session (starting one costs seconds)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from raykd.cluster.ray_env import set_ray_env

set_ray_env()


def pytest_collection_modifyitems(items):
    """Every test that uses the Ray session (directly or through a fixture) is marked `ray`."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # the dashboard serves the state API that Train's placement-group cleaner needs when Tune
        # stops a trial; `raykd_trial` slots let two sweep trials run side by side
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False,
                 resources={"raykd_trial": 2})
    yield ray
    ray.shutdown()


def all_cpus_free(ray, timeout_s: float = 60) -> bool:
    """Wait until nothing holds any of the session's CPUs (runs, trials and their placement
    groups released); whether that happened within `timeout_s`."""
    import time

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def small_job(tmp_path, **sections) -> dict:
    """A digits job small enough for a unit test (seconds of training per run)."""
    job = {
        "name": "t", "output_dir": str(tmp_path), "seeds": [0],
        "data": {"dataset": "digits", "batch_size": 64},
        "teacher": {"model": "cnn", "train": {"epochs": 3, "lr": 0.1}},
        "student": {"model": "cnn_small", "train": {"epochs": 3, "lr": 0.1}},
        "methods": {"ce": {}, "kd": {"temperature": 4, "alpha": 0.9}},
        "ray": {"workers": 1, "max_failures": 0},
    }
    for key, value in sections.items():
        job[key] = value
    return job


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """An untrained `cnn` teacher export for digits (1x8x8, 10 classes), seed 0: enough for the
    tests that only need a frozen teacher's shapes and a deterministic output."""
    import torch

    from raykd.models import build_model
    from raykd.models.export import save_export

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(0)
    save_export(build_model("cnn", 10, 1, 8), path, 10, 1, 8)
    return path


RAYKD = str(Path(sys.executable).parent / "raykd")


QUICKSTART = Path(__file__).resolve().parent.parent / "jobs" / "quickstart.yaml"


@pytest.fixture(scope="session")
def tracked_run(ray_session, tmp_path_factory):
    """The quickstart itself (every method: teachers, DIH heads, neighbourhood parts, CE, KD,
    CD+GKD, KD-top5, DIH, FEED and stitched students), made small by overrides (two seeds, 200
    training, 100 validation and 200 test images, a few epochs; CD with an Early Decay Teacher
    schedule) and tracked to MLflow and TensorBoard, run twice through `raykd run` on the
    session's Ray: the first run fails seed0-kd after its epoch 2, the second resumes it. Shared
    by the tracking, progress, export and report tests."""
    root = tmp_path_factory.mktemp("tracked")
    overrides = [
        f"output_dir={root}", "seeds=[0,1]", "data.train_size=200", "data.val_size=100",
        "data.test_size=200",
        "teacher.train.epochs=2", "student.train.epochs=3", "heads.train.epochs=2",
        "methods.nd.train.epochs=2", "methods.nd.finetune_epochs=1", "methods.cd_gkd.edt=true",
        "ray.max_failures=0",
        "tracking.mlflow=true", "tracking.tensorboard=true"]
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "RAY_AUTH_MODE": "disabled"}

    def run(**extra):
        return subprocess.run([RAYKD, "run", str(QUICKSTART), *overrides], env={**env, **extra},
                              capture_output=True, text=True, timeout=480)
    first = run(RAYKD_FAIL_AT="seed0-kd:2")
    second = run()
    for name, done in (("first", first), ("second", second)):   # to read when a test fails
        (root / f"{name}.log").write_text(done.stdout + done.stderr)
    return SimpleNamespace(root=root, run_dir=root / "quickstart", first=first, second=second)
