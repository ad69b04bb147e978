"""Teacher outputs served by shard actors against the in-process forward; and the feature cache.

Part 1, throughput (images/s) of teacher taps for the quickstart's teacher (cnn_wide on 1x28x28,
batch 256): in-process (1 thread), actors with 1 and 2 replicas (1 CPU each), for logits alone and
for logits plus all stage maps. Part 2, a KD job's first run (cache miss: the teacher pass is
computed and stored) against its second run (cache hit), and against no cache at all.

    .venv/bin/python bench/teacher_service.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import fresh_workdir, machine, quickstart_teacher, write_section  # noqa: E402


def throughput(teacher, x, taps, batches: int, window: int = 4) -> float:
    """Images/s with up to `window` requests in flight (what a prefetching loop does)."""
    teacher.features(x, taps)  # warm-up
    started = time.perf_counter()
    in_flight = []
    for _ in range(batches):
        in_flight.append(teacher.submit(x, taps))
        if len(in_flight) >= window:
            in_flight.pop(0).result()
    for p in in_flight:
        p.result()
    return batches * len(x) / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=24)
    args = ap.parse_args()

    import pandas as pd

    from raykd.config import job_from_dict
    from raykd.pipeline import run_job
    from raykd.ray_env import init_ray
    from raykd.teacher import LocalTeacher
    from raykd.teacher.service import TeacherClient, TeacherService

    work = fresh_workdir("teacher_service")
    teacher_path = quickstart_teacher(work)
    x = torch.randn(256, 1, 28, 28)
    tap_sets = {"logits": ["logits"], "logits + 3 stage maps": ["stage1", "stage2", "stage3", "logits"]}

    torch.set_num_threads(1)
    local = LocalTeacher(teacher_path)
    rows = []
    init_ray(num_cpus=2, log_to_driver=False)
    for label, taps in tap_sets.items():
        row = {"taps": label, "in-process": throughput(local, x, taps, args.batches)}
        for replicas in (1, 2):
            svc = TeacherService(f"bench-{replicas}", str(teacher_path), (1, 28, 28),
                                 replicas=replicas, cpus_per_shard=1)
            svc.wait_ready()
            row[f"actors x{replicas}"] = throughput(TeacherClient(svc.handle), x, taps, args.batches)
            svc.stop()
        rows.append(row)
        print(row, flush=True)

    # Part 2: the same KD job three times: no cache, first run with cache, second run with cache
    def kd_run(name: str, cache: bool) -> dict:
        job = {"name": name, "output_dir": str(work), "seeds": [0],
               "data": {"dataset": "mnist5k", "batch_size": 64},
               "teacher": {"model": "cnn_wide", "checkpoint": str(teacher_path), "cache": cache,
                           "placement": "local"},
               "student": {"model": "cnn_small", "train": {"epochs": 3}},
               "methods": {"kd": {}}, "ray": {"max_failures": 0}}
        df = run_job(job_from_dict(job))
        return df.iloc[0].to_dict()

    nocache = kd_run("nocache", cache=False)
    first = kd_run("first", cache=True)
    second = kd_run("second", cache=True)
    import ray
    ray.shutdown()
    for r in (nocache, first, second):
        print({k: r[k] for k in ("unit", "wall_s", "train_s", "val_top1")})

    table = pd.DataFrame(rows)
    lines = ["| teacher taps | in-process | actors, 1 replica | actors, 2 replicas | 1 replica / in-process | 2 replicas / 1 replica |",
             "| --- | --- | --- | --- | --- | --- |"]
    for _, r in table.iterrows():
        lines.append(f"| {r['taps']} | {r['in-process']:.0f} img/s | {r['actors x1']:.0f} img/s | "
                     f"{r['actors x2']:.0f} img/s | {r['actors x1'] / r['in-process']:.2f}x | "
                     f"{r['actors x2'] / r['actors x1']:.2f}x |")
    body = f"""## Teacher service: shard actors vs in-process, and the teacher-output cache

`.venv/bin/python bench/teacher_service.py`; {machine()}.

Throughput of teacher outputs for cnn_wide (0.39M params) on 1x28x28 batches of 256, one CPU
per actor, 4 requests in flight, one thread in-process:

{chr(10).join(lines)}

A KD job (mnist5k, 3,000 training images, cnn_small student, 3 epochs, teacher in-process):

| run | Ray Train run wall time | training time (sum of epochs) | val_top1 |
| --- | --- | --- | --- |
| no cache | {nocache['wall_s']:.1f} s | {nocache['train_s']:.1f} s | {nocache['val_top1']:.4f} |
| first run, cache miss (computes and stores) | {first['wall_s']:.1f} s | {first['train_s']:.1f} s | {first['val_top1']:.4f} |
| second run, cache hit | {second['wall_s']:.1f} s | {second['train_s']:.1f} s | {second['val_top1']:.4f} |

Second run against first: **{second['wall_s'] / first['wall_s']:.2f}x** wall time
(training time {second['train_s'] / first['train_s']:.2f}x); against no cache
{second['wall_s'] / nocache['wall_s']:.2f}x. The first run's cache fill is one teacher pass over
the training split, paid once; every later epoch and every later run with the same teacher and
split reads the stored outputs instead of running the teacher.
"""
    write_section("teacher_service", body)
    print(body)


if __name__ == "__main__":
    main()
