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

from raykd.models import build_model, count_macs, count_params
from raykd.train.heads import train_heads
from raykd.train.loop import quiet_ray_logs, train_unit
from raykd.train.neighbourhood import train_neighbourhood
from raykd.train.unit import Unit


def scaling_config(workers: int, cpus_per_worker: float, use_gpu: bool) -> ScalingConfig:
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources)


def read_history(path: str):
    """The run's per-epoch metrics; an epoch repeated after a failure keeps its last record.
    Also written next to it as Parquet."""
    import pandas as pd

    if not path or not Path(path).is_file():
        return None
    history = pd.read_json(path, lines=True)
    history = history.drop_duplicates("epoch", keep="last").sort_values("epoch")
    history.to_parquet(Path(path).with_suffix(".parquet"), index=False)
    return history


@ray.remote(num_cpus=0)
def fit_unit(unit: Unit, storage: str, workers: int, use_gpu: bool, max_failures: int,
             num_classes: int, input_shape: tuple[int, int, int]) -> list[dict]:
    """Train one unit to completion (resuming if it ran before); return its results rows."""
    quiet_ray_logs()
    is_heads, is_part = unit.role == "head", unit.role == "neighbourhood"
    workers = 1 if (is_heads or is_part) else workers   # small units: one worker each
    loop = train_heads if is_heads else train_neighbourhood if is_part else train_unit
    started, started_at = time.perf_counter(), time.time()
    trainer = TorchTrainer(
        loop,
        train_loop_config={"unit": unit},
        scaling_config=scaling_config(workers, unit.cpus_per_worker, use_gpu),
        run_config=RunConfig(
            name=unit.key, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    history = read_history(unit.history_path)
    common = {
        "unit": unit.key, "role": unit.role, "dataset": unit.data.dataset, "seed": unit.seed,
        "wall_s": time.perf_counter() - started, "started_at": started_at,
        "finished_at": time.time(),
        "train_s": float(history["epoch_s"].sum()) if history is not None else None,
        "epochs": metrics.get("epoch"), "workers": workers,
        "resumed_from": metrics.get("resumed_from", 0), "export": unit.export_path,
        "teachers": ",".join(Path(e).stem for e in unit.teacher_exports),
    }
    if is_heads:
        return head_rows(unit, metrics, common)
    if is_part:
        return neighbourhood_rows(unit, metrics, common)
    return student_rows(unit, metrics, common, num_classes, input_shape)


def head_rows(unit: Unit, metrics: dict, common: dict) -> list[dict]:
    from raykd.models.heads import load_heads

    if metrics["teacher_checksum_before"] != metrics["teacher_checksum_after"]:
        raise RuntimeError(f"{unit.key}: the teacher's weights changed during head training")
    heads = load_heads([unit.export_path])
    return [{**common, "method": stage, "model": f"{unit.model}:{stage}",
             "val_top1": metrics[f"val_top1/{stage}"], "test_top1": metrics[f"test_top1/{stage}"],
             "params": count_params(heads[stage]),
             "macs": heads[stage].fc.in_features * heads[stage].fc.out_features,
             "teacher_checksum": metrics["teacher_checksum_after"]}
            for stage in unit.head_stages]


def neighbourhood_rows(unit: Unit, metrics: dict, common: dict) -> list[dict]:
    nb = unit.neighbourhood
    return [{**common, "method": unit.label, "model": nb["candidate"],
             "neighbourhood": nb["name"], "nb_start": nb["start"], "nb_stop": nb["stop"],
             # the teacher's accuracy with just this neighbourhood swapped (data inputs only)
             "val_top1": metrics.get("val_top1", float("nan")),
             "test_top1": metrics.get("test_top1", float("nan")),
             "recon_val": metrics["recon_val"], "params": metrics["candidate_params"],
             "replaced_params": metrics["replaced_params"]}]


def student_rows(unit: Unit, metrics: dict, common: dict, num_classes: int, input_shape
                 ) -> list[dict]:
    """A zoo model's row; a stitched student also gets a row for before its fine-tuning."""
    if unit.stitch:
        from raykd.models.export import load_export
        model = load_export(unit.export_path)
        name = "stitched:" + "+".join(load_candidate_spec(p) for _a, _b, p in unit.stitch["parts"])
    else:
        model = build_model(unit.model, num_classes, input_shape[0], input_shape[1])
        name = unit.model
    row = {**common, "method": unit.label, "model": name, "val_top1": metrics.get("val_top1"),
           "test_top1": metrics.get("test_top1"), "params": count_params(model),
           "macs": count_macs(model, input_shape)}
    if not unit.stitch or unit.reinit:
        return [row]
    before = {**row, "method": f"{unit.label}.stitched", "epochs": 0,
              "val_top1": metrics["initial_val_top1"], "test_top1": metrics["initial_test_top1"]}
    return [before] if unit.optim.epochs == 0 else [before, row]


def load_candidate_spec(path: str) -> str:
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)["spec"]
