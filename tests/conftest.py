"""One real local Ray instance for the whole test session (starting one costs seconds)."""
from __future__ import annotations

import os

import pytest

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
