"""Sweep throughput: trials per hour with 2 trials at once against 1, and with the teacher-output
cache against without, measured side by side on one machine.

The same FIFO sweep each time: KD on mnist5k (1,000 training images), cnn_wide teacher (trained
once, beforehand, and shared), cnn_small student, 4 epochs, 6 temperatures.

    .venv/bin/python bench/sweep.py
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import alternating, fresh_workdir, machine, median_spread, quickstart_teacher, write_section  # noqa: E402


def job(work: Path, name: str, teacher: Path, concurrent: int, cache: bool) -> dict:
    return {
        "name": name, "output_dir": str(work), "seeds": [0],
        "data": {"dataset": "mnist5k", "train_size": 1000, "batch_size": 64},
        "teacher": {"model": "cnn_wide", "checkpoint": str(teacher), "cache": cache,
                    "cache_dir": str(work / f"cache-{name}")},
        "student": {"model": "cnn_small", "train": {"epochs": 4, "lr": 0.05}},
        "methods": {"kd": {"temperature": 4, "alpha": 0.9}},
        "sweep": {"method": "kd", "scheduler": "fifo", "num_samples": 1,
                  "max_concurrent": concurrent,
                  "space": {"methods.kd.temperature": {"type": "grid",
                                                       "values": [1, 2, 3, 4, 6, 8]}}}}


def main() -> None:
    import argparse
    import statistics

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from raykd.cluster.ray_env import init_ray
    from raykd.sweep import run_sweep

    work = fresh_workdir("sweep")
    teacher = quickstart_teacher(work)
    init_ray(num_cpus=2, log_to_driver=False)
    count = {}

    def sweep(name: str, concurrent: int, cache: bool):
        def go() -> float:
            count[name] = count.get(name, 0) + 1      # a fresh run folder (and cache) each time
            table, _ = run_sweep(job(work, f"{name}-{count[name]}", teacher, concurrent, cache))
            took = table.attrs["search_s"]   # the search phase: the trials, nothing before or after
            return round(len(table) / took * 3600)
        return go

    rates = alternating({"one_at_a_time": sweep("one_at_a_time", 1, True),
                         "two_at_once": sweep("two_at_once", 2, True),
                         "two_no_cache": sweep("two_no_cache", 2, False)}, args.repeats)
    per_hour = {k: statistics.median(v) for k, v in rates.items()}
    write_section("sweep", f"""
## Sweeps: trials per hour, concurrent trials and the teacher cache

`.venv/bin/python bench/sweep.py --repeats {args.repeats}`; {machine()}.
The same 6-trial FIFO sweep (KD temperature on mnist5k, 1,000 training images, cnn_small
student, 4 epochs; the teacher loaded from an export); the search phase's wall time (Tune's
`fit`: every trial, nothing before or after):

| sweep | trials per hour, median (min-max) of {args.repeats}, alternating |
| --- | --- |
| 1 trial at a time, cache | {median_spread(rates['one_at_a_time'], '', 0)} |
| 2 trials at once, cache | {median_spread(rates['two_at_once'], '', 0)} |
| 2 trials at once, no cache (each trial runs the teacher every step) | {median_spread(rates['two_no_cache'], '', 0)} |

2 at once against 1: **{per_hour['two_at_once'] / per_hour['one_at_a_time']:.2f}x** trials per
hour (target 1.4x); with the cache against without:
**{per_hour['two_at_once'] / per_hour['two_no_cache']:.2f}x**.
Each trial is a Ray Train run of its own (Tune schedules trials; they are not packed), whose
fixed start-up (new processes importing torch; "Fixed cost of one Ray Train run") is CPU work
that two trials at once contend for on 2 cores.
""")


if __name__ == "__main__":
    main()
