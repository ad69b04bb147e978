"""The registry of unit kinds (which `UnitTrainer` trains a unit of each `Unit.kind`), and the
Ray Train worker function for any unit."""
from __future__ import annotations

import gc
import os

from raykd.driver.units import Unit
from raykd.errors import RaykdError, one_line
from raykd.log import log
from raykd.train import heads as _heads  # noqa: F401  (registers heads)
from raykd.train import model as _model  # noqa: F401  (registers model)
from raykd.train import neighbourhood as _neighbourhood  # noqa: F401  (registers neighbourhood)
from raykd.train.lanes import work_lane
from raykd.train.layout import FAILED
from raykd.train.skeleton import UNIT_KINDS, UnitTrainer, run_epochs


def unit_kind(name: str) -> type[UnitTrainer]:
    if name not in UNIT_KINDS:
        raise RaykdError(f"unknown unit kind {name!r}; allowed: {', '.join(sorted(UNIT_KINDS))}")
    return UNIT_KINDS[name]


def train_worker(config: dict) -> None:
    """The Ray Train worker function. config {"units": [unit]}: one unit, on this worker alone or
    data-parallel over all of them. config {"queue": UnitQueue, "retries": N}: a pack, where each
    worker is a lane that takes the next unit off the queue whenever it is free and trains it by
    itself (raykd.train.lanes)."""
    import ray.train

    if "queue" not in config:
        [unit] = config["units"]
        run_epochs(unit_kind(unit.kind), unit)
        return
    work_lane(config["queue"], ray.train.get_context().get_world_rank(),
              lambda unit, threads: train_in_lane(unit, config["retries"], threads))


def train_in_lane(unit: Unit, retries: int, threads=None) -> None:
    """Train one unit of a lane, retrying it from its own last epoch `retries` times; a unit that
    still fails leaves its reason in its folder and the lane goes on with the next unit, so one
    bad unit never costs its lane-mates their run."""
    failed = os.path.join(unit.state_dir, FAILED)
    if os.path.exists(failed):
        os.unlink(failed)          # an earlier attempt's failure; this one starts afresh
    for attempt in range(retries + 1):
        try:
            run_epochs(unit_kind(unit.kind), unit, alone=True, threads=threads)
            return
        except Exception as exc:   # the unit's own failure (a lost worker restarts the pack)
            reason = one_line(exc, typed=True)
            log.warning("[%s] failed (attempt %d of %d): %s", unit.key, attempt + 1,
                        retries + 1, reason)
        finally:
            gc.collect()           # the next unit starts from a clean slate
    os.makedirs(unit.state_dir, exist_ok=True)
    with open(failed, "w") as f:
        f.write(reason)
