"""The Ray internals raykd relies on (raykd.train.ray_internals) are there on the installed Ray
and do what raykd assumes: a Ray that moves them fails here, loudly, not at a user's run."""
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.train.v2.api.exceptions import ControllerError

from raykd.train.ray_internals import (
    DatasetsCallback,
    internals_missing,
    is_placement_timeout,
    without_datasets,
)


def _noop(config):
    pass


def test_the_ray_internals_raykd_uses_are_there():
    assert internals_missing(DataParallelTrainer) == []


def test_a_trainer_without_datasets_drops_that_callback_and_keeps_every_other():
    plain = DataParallelTrainer(_noop)
    lean = without_datasets(DataParallelTrainer)(_noop)
    theirs = [type(c).__name__ for c in plain._create_default_callbacks()]
    ours = [type(c).__name__ for c in lean._create_default_callbacks()]
    assert DatasetsCallback.__name__ in theirs, "Ray no longer adds the dataset manager"
    assert ours == [name for name in theirs if name != DatasetsCallback.__name__]
    assert type(lean).__name__ == "DataParallelTrainer"


def test_a_placement_timeout_is_recognised_and_nothing_else_is():
    assert is_placement_timeout(ControllerError(WorkerGroupStartupTimeoutError(num_workers=2)))
    assert not is_placement_timeout(ControllerError(RuntimeError("something else")))
    assert not is_placement_timeout(RuntimeError("no controller failure"))
