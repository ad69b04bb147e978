"""Launch units as Ray Train runs (a `TorchTrainer` each), from a lightweight Ray task.

A run trains one unit (on one worker, or data-parallel on several), or a *pack*: several units
that need no gradient exchange, trained by the run's workers as *lanes*: each worker takes the
next unit off the pack's queue (raykd.train.lanes) whenever it is free. A pack pays one run's
fixed start-up (controller, placement group, worker processes importing torch) for all its
units. Every packed unit checkpoints into its own folder each epoch, so a lost worker restarts
the pack and each unit resumes from its own last epoch (finished ones are not trained again); a
unit that raises is retried in its lane and, if it still fails, only it fails. Each run is named
after its units under the job's storage folder, so re-running the job resumes it. Several runs
go concurrently: the launching task takes no CPU.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from raykd.driver.units import Unit
from raykd.log import quiet_ray_logs
from raykd.outputs.results import load_history
from raykd.train.lanes import UnitQueue
from raykd.train.layout import FAILED, metrics_file, state_file
from raykd.train.ray_internals import is_placement_timeout, without_datasets


def scaling_config(workers: int, cpus_per_worker: float, gpus_per_worker: float,
                   extra: dict[str, float] | None = None) -> ScalingConfig:
    """Workers with these resources each; a GPU (or a fraction of one) when gpus_per_worker > 0;
    `extra`: custom resources (e.g. to pin runs to one node type)."""
    resources = {**(extra or {}), "CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    return ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                         resources_per_worker=resources)


def read_history(path: str):
    """The run's per-epoch metrics (`load_history`), also written next to it as Parquet."""
    history = load_history(path)
    if history is not None:
        history.to_parquet(Path(path).with_suffix(".parquet"), index=False)
    return history


def latest_state(storage: str, key: str) -> str | None:
    """The newest folder under `storage` that holds this unit's state: a run's checkpoint or the
    unit's own folder from a pack, so a unit resumes however it is packed now and was before."""
    found = sorted(Path(storage).glob(f"*/*/{state_file(key)}"), key=lambda p: p.stat().st_mtime)
    return str(found[-1].parent) if found else None


def run_name(units: list[Unit]) -> str:
    """The unit's key; a pack's first key, its size and a digest of all its keys (a folder name
    must stay short, and packed units resume from their own folders, not the run's)."""
    if len(units) == 1:
        return units[0].key
    digest = hashlib.sha256("+".join(u.key for u in units).encode()).hexdigest()[:8]
    return f"{units[0].key}+{len(units) - 1}-{digest}"


def unit_folder(storage: str, key: str) -> str:
    """A packed unit's own checkpoint folder."""
    return str(Path(storage) / "units" / key)


@dataclass(frozen=True)
class RunSettings:
    """How a job's Ray Train runs are made (where they checkpoint, their workers and resources,
    how many failures they survive, how long they may wait to be placed) and the data shapes their
    results rows are computed with. One value, passed whole to every function that builds a run."""
    storage: str                        # the runs' checkpoint folder (RUN_DIR/ray)
    num_classes: int
    input_shape: tuple[int, int, int]
    workers: int = 1                    # a data-parallel unit's workers (a pack: its lanes)
    gpus_per_worker: float = 0.0
    max_failures: int = 1
    resources: dict[str, float] = field(default_factory=dict)   # custom resources per worker
    placement_timeout_s: float = 600.0  # a run not placed by then fails, naming what it needs
    lend_idle_cpus: bool = False

    @classmethod
    def for_job(cls, spec, num_classes: int, input_shape) -> "RunSettings":
        return cls(storage=str(spec.run_dir / "ray"), num_classes=num_classes,
                   input_shape=tuple(input_shape), workers=spec.ray.workers,
                   gpus_per_worker=spec.ray.gpus,
                   max_failures=spec.ray.max_failures,
                   resources=dict(spec.ray.resources_per_worker),
                   placement_timeout_s=spec.ray.placement_timeout_s,
                   lend_idle_cpus=spec.ray.lend_idle_cpus)


@ray.remote(num_cpus=0)
def fit_units(units: list[Unit], settings: RunSettings,
              lanes: int | None = None) -> dict[str, list[dict] | Exception]:
    """Train these units to completion (resuming if they ran before), one run; return each
    unit's results rows, or the exception that failed it. Several units are a pack over `lanes`
    workers (default: one unit per worker), its queue closed from the start."""
    quiet_ray_logs()
    if len(units) > 1:
        queue = UnitQueue.remote()
        ray.get(queue.add.remote(queued(units, settings.storage)))
        ray.get(queue.close.remote())
        return run_pack(queue, settings, max(1, min(lanes or len(units), len(units))),
                        units[0].cpus_per_worker, run_name(units))
    [unit] = units
    unit.resume_dir = unit.resume_dir or latest_state(settings.storage, unit.key)
    workers = settings.workers if unit_kind(unit.kind).data_parallel else 1
    started_at = time.time()
    result, error = fit(trainer_for({"units": units}, settings, workers, unit.cpus_per_worker,
                                    unit.key), settings)
    if error is not None:
        return {unit.key: error}
    last = result.checkpoint.path if result.checkpoint is not None else None
    return {unit.key: unit_rows(unit, read_metrics(last, unit.key), started_at, workers, 1,
                                settings)}


def fit(trainer, settings: RunSettings):
    """(result, error) of one run: Train V2 raises once a run's retries are spent; a run that
    could not be placed within the settings' placement timeout fails with one line naming what
    it waited for. Train takes how long one attempt may wait for placement from the environment
    of the process that calls fit() (and hands it to the run's controller), so it is set here,
    for this call only: the process (a launching task, a Tune trial) runs one fit() at a time."""
    _, each_s = placement_steps(settings.placement_timeout_s)
    previous = os.environ.get(START_TIMEOUT)
    os.environ[START_TIMEOUT] = f"{each_s:g}"
    try:
        result = trainer.fit()
        return result, result.error
    except TrainingFailedError as e:
        return None, unplaced(e, trainer.scaling_config) or e
    finally:
        if previous is None:
            os.environ.pop(START_TIMEOUT, None)
        else:
            os.environ[START_TIMEOUT] = previous


def unplaced(error: BaseException, scaling: ScalingConfig) -> RuntimeError | None:
    """The one-line error for a run whose workers could not be placed (Train V2 gives up on a
    worker group it cannot place after its start timeout, `controller_failure_limit` times)."""
    if not is_placement_timeout(error):
        return None
    need = scaling.resources_per_worker or {"CPU": 1}
    available = ray.available_resources()
    free = {k: round(available.get(k, 0.0), 2) for k in need}
    return RuntimeError(f"no room for the run's {scaling.num_workers} worker(s) ({need} each) "
                        "within the placement timeout (ray.placement_timeout_s); the cluster has "
                        f"{free} free")


def trainer_class(workers: int, packed: bool = False):
    """`TorchTrainer` for a data-parallel unit (its workers exchange gradients through a torch
    process group); Train V2's plain `DataParallelTrainer` otherwise: a pack's lanes and a
    one-worker run need no process group, and skipping its set-up cuts each run's start-up by
    about 4 s (bench/RESULTS.md, "Fixed cost of one Ray Train run"). Either way without Ray
    Data's dataset manager (`without_datasets`)."""
    if workers > 1 and not packed:
        from ray.train.torch import TorchTrainer
        return without_datasets(TorchTrainer)
    return without_datasets(DataParallelTrainer)


def unit_kind(name: str):
    """raykd.train.kinds.unit_kind, imported on first use (it imports torch)."""
    from raykd.train.kinds import unit_kind as kind

    return kind(name)


def train_worker(config: dict) -> None:
    """The Ray Train worker function, raykd.train.kinds.train_worker, imported in the worker: the
    task that launches a run then never imports torch (about 3 s of its start-up)."""
    from raykd.train.kinds import train_worker as train

    train(config)


def trainer_for(config: dict, settings: RunSettings, workers: int, cpus_per_worker: float,
                name: str, callbacks: tuple = ()):
    """The one place a Ray Train run is built, for job runs and sweep trials alike: `workers`
    with `cpus_per_worker` each (and the settings' GPUs and custom resources), named `name` under
    the settings' storage, so re-running resumes it. A run waits at most about
    `placement_timeout_s` for its workers to be placed, in Train's start-timeout steps (`fit`
    sets their length)."""
    return trainer_class(workers, packed="queue" in config)(
        train_worker,
        train_loop_config=config,
        scaling_config=scaling_config(workers, cpus_per_worker, settings.gpus_per_worker,
                                      settings.resources),
        run_config=RunConfig(
            name=name, storage_path=settings.storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(
                max_failures=settings.max_failures,
                controller_failure_limit=placement_steps(settings.placement_timeout_s)[0] - 1),
            callbacks=list(callbacks),
            logging_config=QUIET_TRAIN))


# Train's own setting: how long one attempt waits for a run's workers to be placed (60 s)
START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def placement_steps(timeout_s: float) -> tuple[int, float]:
    """(attempts, seconds each) that wait `timeout_s` in all: Train gives up on a worker group
    it cannot place after its start timeout (START_TIMEOUT in the environment, else 60 s) and
    tries again `controller_failure_limit` times, so the job's timeout is cut into equal
    attempts no longer than that (600 s: ten of 60 s; 30 s: one of 30 s, not one of 60)."""
    longest = float(os.environ.get(START_TIMEOUT, 60.0))
    attempts = max(1, math.ceil(timeout_s / longest))
    return attempts, timeout_s / attempts


# Train's controller logs each worker group's start at INFO; raykd's own lines say enough
QUIET_TRAIN = LoggingConfig(log_level="WARNING")


def queued(units: list[Unit], storage: str) -> list[Unit]:
    """Ready units for a pack's queue: each checkpoints into its own folder, resumes from its
    newest state, and counts its wall time from now."""
    now = time.time()
    for u in units:
        u.state_dir = unit_folder(storage, u.key)
        u.resume_dir = u.resume_dir or latest_state(storage, u.key)
        u.queued_at = now
    return units


def packed_outcome(unit: Unit, packed: int, settings: RunSettings, lane_s: float | None = None):
    """A packed unit's rows once its lane finished it, the exception that failed it, or None
    (not finished). `lane_s`: how long its lane spent on it."""
    metrics = read_metrics(unit.state_dir, unit.key)
    if metrics.get("epoch") == unit.optim.epochs and Path(unit.export_path).exists():
        rows = unit_rows(unit, metrics, unit.queued_at, 1, packed, settings)
        return [{**row, "lane_s": lane_s} for row in rows]
    failed = Path(unit.state_dir) / FAILED
    if failed.is_file():
        return RuntimeError(failed.read_text())
    return None


def run_pack(queue, settings: RunSettings, lanes: int, cpus_per_worker: float, name: str,
             polled: bool = False) -> dict:
    """Fit one run whose `lanes` workers drain `queue`; return every queued unit's outcome, or,
    when `polled`, the outcomes of the units its lanes did not report finished (the driver's
    `OpenPack.poll` has read the others)."""
    _, error = fit(trainer_for({"queue": queue, "retries": settings.max_failures}, settings,
                               lanes, cpus_per_worker, name), settings)
    ray.get(queue.close.remote())     # nothing more may join a run that has ended
    units = ray.get(queue.all_units.remote())
    spans = ray.get(queue.lane_seconds.remote())
    # A model's rows time its forward pass (seconds for an ImageNet ResNet): computing again rows
    # the driver has polled would only delay this run's end, which the process's next run awaits.
    reported = set(ray.get(queue.finished_since.remote(0))) if polled else set()
    owed = [u for u in units if u.key not in reported]
    out = {}
    for u in owed:
        outcome = packed_outcome(u, len(units), settings, spans.get(u.key))
        if outcome is not None:
            out[u.key] = outcome
    unfinished = [u for u in owed if u.key not in out]
    if not unfinished:
        return out
    if error is None:   # cannot happen unless a lane ended early; never silent
        error = RuntimeError("the pack ended before a lane trained this unit")
    running = ray.get(queue.running.remote())
    return {**out, **_rescue(unfinished, running, lanes, error, settings)}


@ray.remote(num_cpus=0)
def fit_pack(queue, settings: RunSettings, lanes: int, cpus_per_worker: float, name: str) -> dict:
    quiet_ray_logs()
    return run_pack(queue, settings, lanes, cpus_per_worker, name, polled=True)


class OpenPack:
    """A packed run seen from the driver: units join its queue while it runs (`offer`), finished
    ones are read as they finish (`poll`), and `ref` resolves to every unit's outcome once the
    queue is closed and drained."""

    def __init__(self, units: list[Unit], settings: RunSettings, lanes: int, accept=None,
                 priority: dict[str, int] | None = None, runtime_env: dict | None = None):
        """`accept(pack, keys)`: which offered keys join it (the caller queues them);
        `priority`: key -> how many units wait on it (those are trained first); with
        `settings.lend_idle_cpus` a busy lane borrows its idle neighbours' CPUs (train.lanes);
        `runtime_env`: the run's (its workers inherit it), e.g. a job's own factories."""
        self.settings, self.storage = settings, settings.storage
        self.accept, self.priority = accept, priority or {}
        self.cpus_per_worker = units[0].cpus_per_worker
        self.queue = UnitQueue.remote(settings.lend_idle_cpus)
        self.resolved: dict[str, list[dict]] = {}   # settled without training (reused)
        self.reported = 0
        # A new queue takes every unit, so the run is launched without waiting for the queue's
        # actor to start (its process start overlaps the run's); a lane that asks before the
        # units are in is told to wait, and `poll` surfaces an error of this first add.
        self.first_add = self.queue.add.remote(queued(units, self.storage),
                                               self.priorities(units))
        self.units: dict[str, Unit] = {u.key: u for u in units}
        fit = fit_pack.options(runtime_env=runtime_env) if runtime_env else fit_pack
        self.ref = fit.remote(self.queue, settings, lanes, self.cpus_per_worker, run_name(units))

    @property
    def keys(self) -> list[str]:
        return list(self.units) + list(self.resolved)

    def priorities(self, units: list[Unit]) -> dict[str, int]:
        return {u.key: self.priority.get(u.key, 0) for u in units}

    def add(self, units: list[Unit]) -> bool:
        if not ray.get(self.queue.add.remote(queued(units, self.storage),
                                             self.priorities(units))):
            return False
        self.units.update({u.key: u for u in units})
        return True

    def settle(self, key: str, rows: list[dict]) -> None:
        """A unit that joins already finished (taken from a store or library): its rows come
        back with the next poll."""
        self.resolved[key] = rows

    def offer(self, keys: list[str]) -> list[str]:
        return self.accept(self, keys) if self.accept else []

    def close(self) -> None:
        ray.get(self.queue.close.remote())

    def training(self) -> int:
        """Units its lanes are training now."""
        return len(ray.get(self.queue.running.remote()))

    def poll(self) -> dict:
        """Outcomes of the units finished since the last poll."""
        if self.first_add is not None:
            ray.get(self.first_add)
            self.first_add = None
        keys = ray.get(self.queue.finished_since.remote(self.reported))
        self.reported += len(keys)
        out, self.resolved = self.resolved, {}
        spans = ray.get(self.queue.lane_seconds.remote()) if keys else {}
        for key in keys:
            outcome = packed_outcome(self.units[key], len(self.units), self.settings,
                                     spans.get(key))
            out[key] = outcome if outcome is not None else RuntimeError(
                f"{key} left its lane unfinished")
        return out


def _rescue(unfinished, running, lanes: int, error, settings: RunSettings) -> dict:
    """A pack failed after its restarts: the unit each failed worker was training fails; every
    other unfinished unit goes on in a new pack, from its newest state."""
    blamed = getattr(error, "worker_failures", None) or dict.fromkeys(running, error)
    waiting = {u.key for u in unfinished}
    out = {}
    for rank, exc in blamed.items():
        culprit = running.get(rank)
        if culprit in waiting:
            out[culprit] = exc
    if not out:                        # no lane to blame: fail them all rather than loop
        return {u.key: error for u in unfinished}
    rest = [u for u in unfinished if u.key not in out]
    if rest:
        for u in rest:
            u.resume_dir, u.state_dir = latest_state(settings.storage, u.key), ""
        out.update(ray.get(fit_units.remote(rest, settings, lanes=lanes)))
    return out


def read_metrics(folder: str | None, key: str) -> dict:
    """A unit's metrics at its last checkpointed epoch, from a run's checkpoint or its own folder."""
    import json

    path = Path(folder or "") / metrics_file(key)
    return json.loads(path.read_text()) if folder and path.is_file() else {}


def unit_rows(unit: Unit, metrics: dict, started_at: float, workers: int, packed: int,
              settings: RunSettings) -> list[dict]:
    """`started_at`: when its run was launched (a packed unit: when it was queued)."""
    history = read_history(unit.history_path)
    wall_s = time.time() - started_at
    if packed > 1 and history is not None:   # its lane went on after it: until its training ended
        ended = float(history["epoch_finished_at"].max()) - started_at
        wall_s = min(wall_s, ended) if ended > 0 else wall_s
    common = {
        "unit": unit.key, "settings": unit.settings, "role": unit.role,
        "dataset": unit.data.dataset, "seed": unit.seed,
        "wall_s": wall_s, "started_at": started_at,
        "finished_at": time.time(),
        "train_s": float(history["epoch_s"].sum()) if history is not None else None,
        # when the workers actually trained (first epoch's start, last epoch's end)
        "trained_from": float(history["epoch_started_at"].min()) if history is not None else None,
        "trained_until": float(history["epoch_finished_at"].max()) if history is not None else None,
        "epochs": metrics.get("epoch"), "workers": workers,
        "packed": packed, "node": metrics.get("node"),   # units that shared the run
        "resumed_from": metrics.get("resumed_from", 0), "export": unit.export_path,
        "teachers": ",".join(Path(e).stem for e in unit.teacher_exports),
    }
    return unit_kind(unit.kind).rows(unit, metrics, common, settings.num_classes,
                                     settings.input_shape)
