"""The registry of unit kinds (which `UnitTrainer` trains a unit of each `Unit.kind`), and the
Ray Train worker function for any unit."""
from __future__ import annotations

from raykd.errors import RaykdError
from raykd.train import heads as _heads  # noqa: F401  (registers heads)
from raykd.train import model as _model  # noqa: F401  (registers model)
from raykd.train import neighbourhood as _neighbourhood  # noqa: F401  (registers neighbourhood)
from raykd.train.skeleton import UNIT_KINDS, UnitTrainer, run_epochs


def unit_kind(name: str) -> type[UnitTrainer]:
    if name not in UNIT_KINDS:
        raise RaykdError(f"unknown unit kind {name!r}; allowed: {', '.join(sorted(UNIT_KINDS))}")
    return UNIT_KINDS[name]


def train_worker(config: dict) -> None:
    """The Ray Train worker function (config: {"units": [Unit, ...]}): one unit, on this worker
    alone or data-parallel over all of them; or a pack, where worker i trains unit i alone."""
    import ray.train

    units = config["units"]
    if len(units) == 1:
        run_epochs(unit_kind(units[0].kind), units[0])
        return
    unit = units[ray.train.get_context().get_world_rank()]
    run_epochs(unit_kind(unit.kind), unit, alone=True)
