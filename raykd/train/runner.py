"""Launch units as Ray Train runs (a `TorchTrainer` each), from a lightweight Ray task.

A run trains one unit (on one worker, or data-parallel on several), or a *pack*: several units
that need no gradient exchange, spread over the run's workers as *lanes*, each worker training the
units of its lane one after another. A pack pays one run's fixed start-up (controller, placement
group, worker processes importing torch) for all its units. Every packed unit checkpoints into its
own folder each epoch, so a lost worker restarts the pack and each unit resumes from its own last
epoch (finished ones are not trained again); a unit that raises is retried in its lane and, if it
still fails, only it fails. Each run is named after its units under the job's storage folder, so
re-running the job resumes it. Several runs go concurrently: the launching task takes no CPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer

from raykd.log import quiet_ray_logs
from raykd.train.kinds import FAILED, train_worker, unit_kind
from raykd.train.progress import state_file
from raykd.units import Unit


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
    """The run's per-epoch metrics; an epoch repeated after a failure keeps its last record.
    Also written next to it as Parquet."""
    import pandas as pd

    if not path or not Path(path).is_file():
        return None
    history = pd.read_json(path, lines=True, convert_dates=False)   # times stay epoch seconds
    history = history.drop_duplicates("epoch", keep="last").sort_values("epoch")
    history.to_parquet(Path(path).with_suffix(".parquet"), index=False)
    return history


def latest_state(storage: str, key: str) -> str | None:
    """The newest folder under `storage` that holds this unit's state: a run's checkpoint or the
    unit's own folder from a pack, so a unit resumes however it is packed now and was before."""
    found = sorted(Path(storage).glob(f"*/*/{state_file(key)}"), key=lambda p: p.stat().st_mtime)
    return str(found[-1].parent) if found else None


def run_name(units: list[Unit]) -> str:
    return units[0].key if len(units) == 1 else "+".join(u.key for u in units)


def unit_folder(storage: str, key: str) -> str:
    """A packed unit's own checkpoint folder."""
    return str(Path(storage) / "units" / key)


def split_into_lanes(units: list[Unit], lanes: int) -> list[list[Unit]]:
    """Longest first, each to the lane with the least work so far (work: epochs, at least 1),
    so the lanes of a pack end at about the same time."""
    out: list[list[Unit]] = [[] for _ in range(max(1, min(lanes, len(units))))]
    load = [0] * len(out)
    for unit in sorted(units, key=lambda u: -max(1, u.optim.epochs)):
        i = load.index(min(load))
        out[i].append(unit)
        load[i] += max(1, unit.optim.epochs)
    return out


@ray.remote(num_cpus=0)
def fit_units(units: list[Unit], storage: str, workers: int, use_gpu: bool, max_failures: int,
              num_classes: int, input_shape: tuple[int, int, int],
              resources: dict[str, float] | None = None,
              lanes: int | None = None) -> dict[str, list[dict] | Exception]:
    """Train these units to completion (resuming if they ran before), one run; return each
    unit's results rows, or the exception that failed it. Several units are a pack over `lanes`
    workers (default: one unit per worker)."""
    quiet_ray_logs()
    for u in units:
        u.resume_dir = u.resume_dir or latest_state(storage, u.key)
    started, started_at = time.perf_counter(), time.time()
    packed = len(units) > 1
    if packed:
        split = split_into_lanes(units, lanes or len(units))
        for u in units:
            u.state_dir = unit_folder(storage, u.key)
        workers, config = len(split), {"lanes": split, "retries": max_failures}
    else:
        workers = workers if unit_kind(units[0].kind).data_parallel else 1
        config = {"units": units}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=scaling_config(workers, units[0].cpus_per_worker,
                                      1.0 if use_gpu else 0.0, resources),
        run_config=RunConfig(
            name=run_name(units), storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures)))
    try:
        result = trainer.fit()
        error = result.error
    except TrainingFailedError as e:   # Train V2 raises once max_failures are spent
        result, error = None, e
    if not packed:
        if error is not None:
            return {units[0].key: error}
        last = result.checkpoint.path if result.checkpoint is not None else None
        return {units[0].key: unit_rows(units[0], read_metrics(last, units[0].key), started,
                                        started_at, workers, 1, num_classes, input_shape)}
    out: dict[str, list[dict] | Exception] = {}
    for u in units:
        metrics = read_metrics(u.state_dir, u.key)
        if metrics.get("epoch") == u.optim.epochs and Path(u.export_path).exists():
            out[u.key] = unit_rows(u, metrics, started, started_at, 1, len(units), num_classes,
                                   input_shape)
        elif (Path(u.state_dir) / FAILED).is_file():
            out[u.key] = RuntimeError((Path(u.state_dir) / FAILED).read_text())
    unfinished = [u for u in units if u.key not in out]
    if unfinished and error is None:   # cannot happen unless a lane ended early; never silent
        error = RuntimeError("the pack ended before its lane reached this unit")
    if unfinished:
        return {**out, **_rescue(unfinished, split, error, storage, use_gpu, max_failures,
                                 num_classes, input_shape, resources)}
    return out


def _rescue(unfinished, split, error, storage, use_gpu, max_failures, num_classes, input_shape,
            resources) -> dict:
    """A pack failed after its restarts: in each lane whose worker raised, the unit it was
    training fails; every other unfinished unit goes on in a new pack, from its newest state."""
    blamed = getattr(error, "worker_failures", None) or dict.fromkeys(range(len(split)), error)
    waiting = {u.key for u in unfinished}
    out = {}
    for rank, exc in blamed.items():
        culprit = next((u for u in split[rank] if u.key in waiting), None) \
            if rank < len(split) else None
        if culprit is not None:
            out[culprit.key] = exc
    if not out:                        # no lane to blame: fail them all rather than loop
        return {u.key: error for u in unfinished}
    rest = [u for u in unfinished if u.key not in out]
    if rest:
        for u in rest:
            u.resume_dir, u.state_dir = latest_state(storage, u.key), ""
        out.update(ray.get(fit_units.remote(rest, storage, 1, use_gpu, max_failures,
                                            num_classes, input_shape, resources,
                                            lanes=len(split))))
    return out


def read_metrics(folder: str | None, key: str) -> dict:
    """A unit's metrics at its last checkpointed epoch, from a run's checkpoint or its own folder."""
    import json

    path = Path(folder or "") / f"metrics-{key}.json"
    return json.loads(path.read_text()) if folder and path.is_file() else {}


def unit_rows(unit: Unit, metrics: dict, started: float, started_at: float, workers: int,
              packed: int, num_classes: int, input_shape) -> list[dict]:
    history = read_history(unit.history_path)
    wall_s = time.perf_counter() - started
    if packed > 1 and history is not None:   # its lane went on after it: until its training ended
        ended = float(history["epoch_finished_at"].max()) - started_at
        wall_s = min(wall_s, ended) if ended > 0 else wall_s
    common = {
        "unit": unit.key, "role": unit.role, "dataset": unit.data.dataset, "seed": unit.seed,
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
    return unit_kind(unit.kind).rows(unit, metrics, common, num_classes, input_shape)
