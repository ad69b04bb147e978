"""One real local Ray instance for the whole test session (starting one costs seconds)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from raykd.ray_env import set_ray_env

set_ray_env()
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


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


@pytest.fixture(scope="session")
def tracked_run(ray_session, tmp_path_factory):
    """A small job with every kind of report content (CE, KD with Tang's diagnostics, CD with an
    Early Decay Teacher schedule; two seeds), tracked to MLflow and TensorBoard, run twice through
    `raykd run` on the session's Ray: the first run fails seed0-kd after its epoch 2, the second
    resumes it. Shared by the tracking, progress, export and report tests."""
    root = tmp_path_factory.mktemp("tracked")
    job = small_job(root, name="tracked", seeds=[0, 1],
                    methods={"ce": {}, "kd": {"temperature": 4, "alpha": 0.9},
                             "cd": {"edt": True}},
                    tracking={"mlflow": True, "tensorboard": True})
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "RAY_AUTH_MODE": "disabled"}

    def run(**extra):
        return subprocess.run([RAYKD, "run", str(path)], env={**env, **extra},
                              capture_output=True, text=True, timeout=480)
    first = run(RAYKD_FAIL_AT="seed0-kd:2")
    second = run()
    for name, done in (("first", first), ("second", second)):   # to read when a test fails
        (root / f"{name}.log").write_text(done.stdout + done.stderr)
    return SimpleNamespace(root=root, run_dir=root / "tracked", job=job, first=first,
                           second=second)
