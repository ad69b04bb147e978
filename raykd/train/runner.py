"""Launch units as Ray Train runs (a `TorchTrainer` each), from a lightweight Ray task.

A run trains one unit (on one worker, or data-parallel on several), or a *pack*: several units
of the same shape, one per worker, with no gradient exchange between them, so they share one
run's fixed start-up (controller, placement group, worker processes importing torch). Every unit
keeps its own state file in the run's checkpoints, so a failure restarts the group and each unit
resumes from its own last epoch. If a pack still fails, the units whose worker raised fail, and
the others go on alone from the pack's last checkpoint, so one bad unit never takes its pack-mates
down with it. Each run is named after its units under the job's storage folder, so re-running the
job resumes it. Several runs go concurrently: the launching task takes no CPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer

from raykd.log import quiet_ray_logs
from raykd.train.kinds import train_worker, unit_kind
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
    """The newest checkpoint folder, of any run under `storage`, that holds this unit's state:
    a unit resumes even when it is packed differently than before (or not at all)."""
    found = sorted(Path(storage).glob(f"*/checkpoint_*/state-{key}.pt"),
                   key=lambda p: p.stat().st_mtime)
    return str(found[-1].parent) if found else None


def run_name(units: list[Unit]) -> str:
    return units[0].key if len(units) == 1 else "+".join(u.key for u in units)


@ray.remote(num_cpus=0)
def fit_units(units: list[Unit], storage: str, workers: int, use_gpu: bool, max_failures: int,
              num_classes: int, input_shape: tuple[int, int, int],
              resources: dict[str, float] | None = None) -> dict[str, list[dict] | Exception]:
    """Train these units to completion (resuming if they ran before), one run; return each
    unit's results rows, or the exception that failed it."""
    quiet_ray_logs()
    for u in units:
        u.resume_dir = u.resume_dir or latest_state(storage, u.key)
    kind = unit_kind(units[0].kind)
    if len(units) > 1:
        workers = len(units)                          # one unit per worker
    elif not kind.data_parallel:
        workers = 1                                   # small units: one worker each
    started, started_at = time.perf_counter(), time.time()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"units": units},
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
    if error is not None:
        if len(units) == 1:
            return {units[0].key: error}
        return _rescue(units, error, storage, use_gpu, max_failures, num_classes,
                       input_shape, resources)
    last = result.checkpoint.path if result.checkpoint is not None else None
    finals = final_metrics(last, units)
    ddp = workers if len(units) == 1 else 1
    return {u.key: unit_rows(u, finals[u.key], started, started_at, ddp, len(units),
                             num_classes, input_shape) for u in units}


def _rescue(units, error, storage, use_gpu, max_failures, num_classes, input_shape,
            resources) -> dict:
    """A pack failed: the units whose worker raised fail; the others run on alone, each from its
    newest state (the pack's last checkpoint)."""
    blamed = getattr(error, "worker_failures", None) or {r: error for r in range(len(units))}
    out = {units[rank].key: exc for rank, exc in blamed.items() if rank < len(units)}
    innocent = [u for u in units if u.key not in out]
    for u in innocent:
        u.resume_dir = latest_state(storage, u.key)
    if innocent:
        refs = [fit_units.remote([u], storage, 1, use_gpu, max_failures, num_classes,
                                 input_shape, resources) for u in innocent]
        for values in ray.get(refs):
            out.update(values)
    return out


def final_metrics(checkpoint: str | None, units: list[Unit]) -> dict[str, dict]:
    """Each unit's metrics at its last epoch, from the run's latest checkpoint."""
    import json

    out = {}
    for u in units:
        path = Path(checkpoint or "") / f"metrics-{u.key}.json"
        out[u.key] = json.loads(path.read_text()) if checkpoint and path.is_file() else {}
    return out


def unit_rows(unit: Unit, metrics: dict, started: float, started_at: float, workers: int,
              packed: int, num_classes: int, input_shape) -> list[dict]:
    history = read_history(unit.history_path)
    common = {
        "unit": unit.key, "role": unit.role, "dataset": unit.data.dataset, "seed": unit.seed,
        "wall_s": time.perf_counter() - started, "started_at": started_at,
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
