"""Launch one `Unit` as a Ray Train run (a `TorchTrainer`), from a lightweight Ray task.

Each run gets its own name under the job's storage folder, so re-running the job resumes it from
its last checkpoint. Several units run concurrently: the driver task itself takes no CPU, the
Train workers take what the spec asks for, and Ray queues the rest.
"""
from __future__ import annotations

import time
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
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


@ray.remote(num_cpus=0)
def fit_unit(unit: Unit, storage: str, workers: int, use_gpu: bool, max_failures: int,
             num_classes: int, input_shape: tuple[int, int, int],
             resources: dict[str, float] | None = None) -> list[dict]:
    """Train one unit to completion (resuming if it ran before); return its results rows."""
    quiet_ray_logs()
    kind = unit_kind(unit.kind)
    workers = workers if kind.data_parallel else 1   # small units: one worker each
    started, started_at = time.perf_counter(), time.time()
    result = TorchTrainer(
        train_worker,
        train_loop_config={"unit": unit},
        scaling_config=scaling_config(workers, unit.cpus_per_worker, 1.0 if use_gpu else 0.0,
                                      resources),
        run_config=RunConfig(
            name=unit.key, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures)),
    ).fit()
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    history = read_history(unit.history_path)
    common = {
        "unit": unit.key, "role": unit.role, "dataset": unit.data.dataset, "seed": unit.seed,
        "wall_s": time.perf_counter() - started, "started_at": started_at,
        "finished_at": time.time(),
        "train_s": float(history["epoch_s"].sum()) if history is not None else None,
        # when the workers actually trained (first epoch's start, last epoch's end)
        "trained_from": float(history["epoch_started_at"].min()) if history is not None else None,
        "trained_until": float(history["epoch_finished_at"].max()) if history is not None else None,
        "epochs": metrics.get("epoch"), "workers": workers, "node": metrics.get("node"),
        "resumed_from": metrics.get("resumed_from", 0), "export": unit.export_path,
        "teachers": ",".join(Path(e).stem for e in unit.teacher_exports),
    }
    return kind.rows(unit, metrics, common, num_classes, input_shape)
