"""Teacher outputs served by shard actors against the in-process forward; and the feature cache.

Part 1, throughput (images/s) of teacher taps for the quickstart's teacher (cnn_wide on 1x28x28,
batch 256): in-process (1 thread), actors with 1 and 2 replicas (1 CPU each), for logits alone and
for logits plus all stage maps. Part 2, a KD job's first run (cache miss: the teacher pass is
computed and stored) against its second run (cache hit), and against no cache at all.

    .venv/bin/python bench/teacher_service.py
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import (  # noqa: E402
    alternating,
    fresh_workdir,
    machine,
    quickstart_teacher,
    write_block,
    write_section,
)


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
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import pandas as pd

    from raykd.cluster.ray_env import init_ray
    from raykd.driver.pipeline import run_job
    from raykd.job.config import job_from_dict
    from raykd.teacher import LocalTeacher
    from raykd.teacher.service import TeacherClient, TeacherService

    work = fresh_workdir("teacher_service")
    teacher_path = quickstart_teacher(work)
    x = torch.randn(256, 1, 28, 28)
    tap_sets = {"logits": ["logits"], "logits + 3 stage maps": ["stage1", "stage2", "stage3", "logits"]}

    torch.set_num_threads(1)
    local = LocalTeacher(teacher_path)
    init_ray(num_cpus=2, log_to_driver=False)

    fresh = itertools.count()

    def served(replicas: int, taps: list[str]) -> int:
        """Throughput through a fresh service (two services at once would not fit 2 CPUs)."""
        svc = TeacherService(f"bench-{replicas}-{next(fresh)}", str(teacher_path), (1, 28, 28),
                             replicas=replicas, cpus_per_shard=1)
        svc.wait_ready()
        try:
            return round(throughput(TeacherClient(svc.handle), x, taps, args.batches))
        finally:
            svc.stop()

    rows = []
    for label, taps in tap_sets.items():
        rates = alternating({
            "in-process": lambda: round(throughput(local, x, taps, args.batches)),
            "actors x1": lambda: served(1, taps),
            "actors x2": lambda: served(2, taps),
        }, args.repeats)
        rows.append({"taps": label, **{k: statistics.median(v) for k, v in rates.items()},
                     "spread": {k: (min(v), max(v)) for k, v in rates.items()}})

    # Part 2: the same KD job with no cache, and with a fresh cache twice (miss, then hit)
    def kd_run(name: str, cache: bool, cache_dir: str | None = None) -> dict:
        job = {"name": name, "output_dir": str(work), "seeds": [0],
               "data": {"dataset": "mnist5k", "batch_size": 64},
               "teacher": {"model": "cnn_wide", "checkpoint": str(teacher_path), "cache": cache,
                           "cache_dir": cache_dir, "placement": "local"},
               "student": {"model": "cnn_small", "train": {"epochs": 3}},
               "methods": {"kd": {}}, "ray": {"max_failures": 0}}
        return run_job(job_from_dict(job)).iloc[0].to_dict()

    runs = {"no cache": [], "miss": [], "hit": []}

    def without_cache() -> float:
        runs["no cache"].append(kd_run(f"nocache-{len(runs['no cache'])}", cache=False))
        return round(runs["no cache"][-1]["wall_s"], 1)

    def with_cache() -> tuple:
        n = len(runs["miss"])
        folder = str(work / f"cache-{n}")           # a fresh cache: the first run misses
        runs["miss"].append(kd_run(f"miss-{n}", cache=True, cache_dir=folder))
        runs["hit"].append(kd_run(f"hit-{n}", cache=True, cache_dir=folder))
        return round(runs["miss"][-1]["wall_s"], 1), round(runs["hit"][-1]["wall_s"], 1)

    alternating({"no cache": without_cache, "cache miss, then hit": with_cache}, args.repeats)
    import ray
    ray.shutdown()

    def med(name: str, col: str) -> float:
        return statistics.median(r[col] for r in runs[name])

    nocache = {c: med("no cache", c) for c in ("wall_s", "train_s", "val_top1")}
    first = {c: med("miss", c) for c in ("wall_s", "train_s", "val_top1")}
    second = {c: med("hit", c) for c in ("wall_s", "train_s", "val_top1")}

    table = pd.DataFrame(rows)
    lines = ["| teacher taps | in-process | actors, 1 replica | actors, 2 replicas | 1 replica / in-process | 2 replicas / 1 replica |",
             "| --- | --- | --- | --- | --- | --- |"]
    def cell(r, k):
        lo, hi = r["spread"][k]
        return f"{r[k]:.0f} img/s ({lo:.0f}-{hi:.0f})"

    for _, r in table.iterrows():
        lines.append(f"| {r['taps']} | {cell(r, 'in-process')} | {cell(r, 'actors x1')} | "
                     f"{cell(r, 'actors x2')} | {r['actors x1'] / r['in-process']:.2f}x | "
                     f"{r['actors x2'] / r['actors x1']:.2f}x |")
    body = f"""## Teacher service: shard actors vs in-process, and the teacher-output cache

`.venv/bin/python bench/teacher_service.py --repeats {args.repeats}`; {machine()}.

Throughput of teacher outputs for cnn_wide (0.39M params) on 1x28x28 batches of 256, one CPU
per actor, 4 requests in flight, one thread in-process; median (min-max) of {args.repeats}
measurements taken in alternating order:

{chr(10).join(lines)}

A KD job (mnist5k, 3,000 training images, cnn_small student, 3 epochs, teacher in-process),
median of {args.repeats} of each, alternating (the cached pair uses a fresh cache folder each time):

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
    logits, maps = rows[0], rows[1]
    write_block("teacher-service", f"""One actor against in-process, one CPU each: logits
{logits['actors x1']:.0f} against {logits['in-process']:.0f} img/s (**{logits['actors x1'] / logits['in-process']:.2f}x**), logits plus three stage maps
{maps['actors x1']:.0f} against {maps['in-process']:.0f} img/s (**{maps['actors x1'] / maps['in-process']:.2f}x**); two replicas against one:
{logits['actors x2'] / logits['actors x1']:.2f}x (logits). A 3-epoch KD job's training time: {nocache['train_s']:.1f} s without the cache,
{second['train_s']:.1f} s reading it (medians of {args.repeats}).""", "docs/teachers.md")
    print(body)


if __name__ == "__main__":
    main()
