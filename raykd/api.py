"""raykd from Python: `raykd.run` runs a job (a YAML file, a dict or a typed spec) the way
`raykd run` does and returns its results table as a pandas DataFrame.

    import raykd
    table = raykd.run("jobs/quickstart.yaml", ["seeds=[0]", "student.train.epochs=3"])
    table = raykd.run({"name": "mine", "data": {"dataset": "digits"}, "methods": {"kd": {}}})
    table = raykd.run({..., "student": {"model": torchvision.models.mobilenet_v3_small}})

A model or data source may be given as a callable: a torchvision builder or timm entry point, or
a top-level function of a module of yours (Ray's processes import it by name, so not one defined
in a notebook cell: put it in a module file beside the notebook).

Ray: the instance already started in this process, else the cluster in `ray.address` or
RAY_ADDRESS, else a local instance on loopback (as the command does). Bad input raises
`raykd.RaykdError` with the command's one-line message, before any Ray work.
"""
from __future__ import annotations

import copy
from pathlib import Path

from raykd.job.specs import JobSpec


def run(job: str | Path | dict | JobSpec, overrides: list[str] | tuple[str, ...] = ()):
    """Run (or resume) a job; return its results table (one row per trained model)."""
    from raykd.cluster.ray_env import init_ray
    from raykd.data import load_dataset
    from raykd.driver.pipeline import run_job
    from raykd.driver.plan import preflight
    from raykd.job.config import check_writable, job_from_dict, job_runtime_env, load_job
    from raykd.job.factories import named_sources
    from raykd.job.typed import apply_overrides

    if isinstance(job, JobSpec):
        spec = job_from_dict(apply_overrides(named_sources(_plain(job)), list(overrides)))
    elif isinstance(job, dict):
        raw = named_sources(copy.deepcopy(job))
        raw.setdefault("name", "job")
        spec = job_from_dict(apply_overrides(raw, list(overrides)))
    else:
        spec = load_job(job, list(overrides))
    check_writable(spec)
    splits = load_dataset(spec.data)     # absent data fails here, before Ray starts
    preflight(spec, splits)
    init_ray(spec.ray.address, spec.ray.num_cpus, runtime_env=job_runtime_env(spec))
    return run_job(spec, splits=splits, checked=True)


def _plain(spec: JobSpec) -> dict:
    import dataclasses

    return dataclasses.asdict(spec)
