"""Mixed precision on CPU: a KD epoch through raykd in fp32, bf16, bf16 with channels_last, and
fp16 (with its GradScaler), side by side in one invocation.

Same units otherwise: a random-weight `cnn_wide` teacher into a `cnn_small` student (KD alpha
0.1: the labels teach, the teacher still runs every step) on mnist5k
(600 training images, 1x28x28, batch 64), the teacher run every step (no output cache), one
Ray Train worker with one thread. On a CPU without native bf16 arithmetic, autocast to bf16 adds
casts and is usually slower: this says how much, honestly. GPU figures: bench/gpu.py.

    .venv/bin/python bench/precision.py [--epochs 3] [--repeats 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from raykd.driver.units import Unit  # noqa: E402
from raykd.job.specs import DataSpec, OptimSpec  # noqa: E402
from raykd.models import build_model  # noqa: E402
from raykd.models.export import save_export  # noqa: E402
from raykd.teacher import TeacherHandle  # noqa: E402

from results_md import alternating, fresh_workdir, machine, write_section  # noqa: E402

SETTINGS = {"fp32": {}, "bf16": {"precision": "bf16"},
            "bf16 + channels_last": {"precision": "bf16", "channels_last": True},
            "fp16 + GradScaler": {"precision": "fp16"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import pandas as pd
    import ray

    from raykd.cluster.ray_env import init_ray
    from raykd.train.runner import RunSettings, fit_units

    work = fresh_workdir("precision")
    data = DataSpec(dataset="mnist5k", train_size=600, val_size=500, test_size=500,
                    batch_size=64)
    teacher_path = work / "teacher.pt"
    torch.manual_seed(0)
    save_export(build_model("cnn_wide", 10, 1, 28), teacher_path, 10, 1, 28)
    init_ray(num_cpus=2, log_to_driver=False)
    finals: dict[str, list[float]] = {name: [] for name in SETTINGS}

    def run(name: str) -> float:
        run_dir = work / f"run-{len(list(work.glob('run-*')))}"
        optim = dataclasses.replace(OptimSpec(epochs=args.epochs, lr=0.05), **SETTINGS[name])
        unit = Unit(key="kd", role="student", label="kd", method_name="kd",
                    method={"temperature": 4.0, "alpha": 0.1}, model="cnn_small", optim=optim,
                    data=data, seed=0, export_path=str(run_dir / "student.pt"),
                    history_path=str(run_dir / "metrics" / "kd.jsonl"),
                    teacher_candidates=[str(teacher_path)],
                    teachers=[TeacherHandle(str(teacher_path), "local", cache_dir=None)])
        out = ray.get(fit_units.remote([unit], RunSettings(str(run_dir / "ray"), 10, (1, 28, 28),
                                                           max_failures=0)))
        if isinstance(out["kd"], Exception):
            raise out["kd"]
        history = pd.read_parquet(run_dir / "metrics" / "kd.parquet")
        finals[name].append(float(history.val_top1.iloc[-1]))
        return round(float(history.epoch_s.median()), 3)

    runs = alternating({name: (lambda n=name: run(n)) for name in SETTINGS}, args.repeats)
    ray.shutdown()
    base = statistics.median(runs["fp32"])
    rows = "\n".join(
        f"| {name} | {statistics.median(runs[name]):.2f} s | "
        f"{statistics.median(runs[name]) / base:.2f}x | {statistics.mean(finals[name]):.4f} |"
        for name in SETTINGS)
    body = f"""## Mixed precision on CPU: a KD epoch in fp32, bf16, bf16 + channels_last, fp16

`.venv/bin/python bench/precision.py --epochs {args.epochs} --repeats {args.repeats}`; {machine()}.
cnn_wide teacher (random weights) into cnn_small on mnist5k (600 training images, batch 64;
KD alpha 0.1, so that the labels teach against a random teacher), the teacher run every step, one Ray Train worker, one thread; {args.repeats} runs of each setting
in alternating order, medians of each run's median epoch; val top-1 after {args.epochs} epochs
(mean over the runs, same seed: a check that every setting trains, not a comparison).

| setting | KD epoch | against fp32 | val top-1 |
| --- | --- | --- | --- |
{rows}

This CPU has no native bf16 or fp16 arithmetic, so autocast adds casts around every
operation; mixed precision pays on GPUs (bench/gpu.py), not here.
"""
    write_section("precision", body)
    print(body)


if __name__ == "__main__":
    main()
