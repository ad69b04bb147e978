"""The two places where raykd reaches past Ray Train's public API, each checked against the Ray
it runs on (tests/test_ray_internals.py fails on a Ray that changes either; pyproject pins
`ray<2.61` until it is checked again).

- `without_datasets`: Train V2 starts a Ray Data `DatasetManager` actor for every run, a process
  of its own importing ray.data (about 2 s of CPU), even when no dataset is passed; raykd's
  workers read their own data. No public setting turns it off, so a trainer subclass drops that
  one callback from `_create_default_callbacks` (bench/startup.py measures both side by side).
- `is_placement_timeout`: a run that Train could not place within its start timeout fails with a
  `ControllerError` (public) whose cause is `WorkerGroupStartupTimeoutError` (internal); raykd
  turns that into one line naming what the run waited for.

Where Ray has moved either, raykd says so once in its log and goes on without the optimisation
(runs keep every callback; such a failure keeps Train's own message): never silently.
"""
from __future__ import annotations

import functools

from raykd.log import log

try:
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
except ImportError:   # Ray moved it: see `internals_missing`
    DatasetsCallback = None
try:
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
except ImportError:
    WorkerGroupStartupTimeoutError = None


def internals_missing(base: type | None = None) -> list[str]:
    """What of the Ray internals raykd uses this Ray lacks ([] when everything is there)."""
    missing = []
    if DatasetsCallback is None:
        missing.append("ray.train.v2._internal.callbacks.datasets.DatasetsCallback")
    if base is not None and not callable(getattr(base, "_create_default_callbacks", None)):
        missing.append(f"{base.__name__}._create_default_callbacks")
    if WorkerGroupStartupTimeoutError is None:
        missing.append("ray.train.v2._internal.exceptions.WorkerGroupStartupTimeoutError")
    return missing


@functools.cache
def without_datasets(base: type) -> type:
    """`base` (a Train V2 trainer class) without its `DatasetsCallback`. The placement-group
    cleaner, Train's other process per run, stays: when the task that launched a run dies (Ray's
    OOM killer picks retriable tasks first), the run's controller dies with it and only the
    cleaner frees its placement group before the task's retry asks for the same CPUs."""
    missing = internals_missing(base)
    if missing:
        log.warning("this Ray lacks %s: Ray Train runs keep their dataset manager (about 2 s "
                    "of start-up each)", ", ".join(missing))
        return base

    class Trainer(base):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, DatasetsCallback)]

    Trainer.__name__ = Trainer.__qualname__ = base.__name__   # what Train's logs call it
    return Trainer


def is_placement_timeout(error: BaseException) -> bool:
    """Did this run fail because its workers could not be placed in time?"""
    cause = getattr(error, "controller_failure", None)
    return WorkerGroupStartupTimeoutError is not None and \
        isinstance(cause, WorkerGroupStartupTimeoutError)
