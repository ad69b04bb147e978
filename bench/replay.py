"""Replayed teacher views (issue 34): a KD epoch on augmented data that reads the teacher's stored
views, against KD with the teacher run on every step and against a CE epoch, through raykd jobs.

An image folder of real PNG files (mnist5k written by `raykd data export`, 32x32 grey, 2,000
training images) augmented with the CIFAR recipe (pad 4, random crop, flip); a timm:resnet10t
teacher trained once (job `teacher`), then, from that checkpoint, a `cnn` (raykd zoo)
student per seed: KD online (job `online`), and CE and KD on replayed views (job `replay`). One
unit at a time (`ray.max_parallel: 1`), one CPU each. Target: a replayed KD epoch at most 1.15x
a CE epoch; test accuracy of replayed KD within one standard deviation of online KD's.

    .venv/bin/python bench/replay.py [--epochs 6] [--views 6] [--topk 5] [--seeds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import raykd  # noqa: E402
from raykd.data.folder import export_folder  # noqa: E402

from results_md import fresh_workdir, machine, write_section  # noqa: E402

TEACHER, STUDENT = "timm:resnet10t", "cnn"   # 22.3 M and 4.9 M multiply-adds an image


def job(name: str, work: Path, seeds: list[int], epochs: int, methods: dict, teacher: dict) -> dict:
    return {
        "name": name, "output_dir": str(work / "out"), "seeds": seeds,
        "data": {"dataset": "imagefolder", "root": str(work / "png"), "image_size": 32,
                 "batch_size": 64, "train_size": 2000, "val_size": 300, "test_size": 300,
                 "augment": "cifar"},
        "teacher": {"model": TEACHER, **teacher},
        "student": {"model": STUDENT, "train": {"epochs": epochs, "lr": 0.05}},
        "methods": methods,
        "ray": {"workers": 1, "cpus_per_worker": 1, "max_parallel": 1, "max_failures": 0},
    }


def epoch_seconds(run_dir: Path, label: str, seeds: list[int]) -> list[float]:
    """Median epoch time of each seed's unit (the training loop's own per-epoch figure)."""
    import pandas as pd

    return [float(pd.read_parquet(run_dir / "metrics" / f"seed{s}-{label}.parquet").epoch_s
                  .median()) for s in seeds]


def mean_std(values) -> str:
    values = list(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def time_fill(raw: dict, cache_dir: Path) -> float:
    """Seconds to fill the job's replay entry for KD, in this process on one thread."""
    import torch

    from raykd.data import load_dataset
    from raykd.job.config import job_from_dict
    from raykd.methods import MethodContext, build_method
    from raykd.models import build_model
    from raykd.models.export import load_export
    from raykd.teacher.handle import TeacherHandle
    from raykd.teacher.local import LocalTeacher
    from raykd.teacher.replay import ReplayedViews, replayed_teacher

    torch.set_num_threads(1)
    spec = job_from_dict(raw)
    splits = load_dataset(spec.data)
    teacher = spec.teacher.checkpoint
    arch = load_export(teacher)
    method = build_method("kd", raw["methods"]["kd"], MethodContext(
        student=build_model(STUDENT, splits.num_classes, splits.in_channels, splits.image_size),
        num_classes=splits.num_classes, input_shape=splits.input_shape, teacher=arch,
        teachers=[arch]))
    views = ReplayedViews(splits.train, spec.teacher.replay, 0)
    started = time.perf_counter()
    replayed_teacher(TeacherHandle(teacher, cache_dir=str(cache_dir)), arch,
                     lambda: LocalTeacher(teacher), method, spec.data, views,
                     splits.num_classes, [], "cpu", say=print)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--teacher-epochs", type=int, default=6)
    args = ap.parse_args()

    work = fresh_workdir("replay")
    export_folder("mnist5k", work / "png", limit=2600)
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    teacher_rows = raykd.run(job("teacher", work, [0], 1, {"ce": {}},
                                 {"train": {"epochs": args.teacher_epochs, "lr": 0.05}}))
    teacher = teacher_rows[teacher_rows.role == "teacher"].iloc[0]
    frozen = {"checkpoint": str(teacher.export)}
    kd = {"temperature": 4.0, "alpha": 0.9}
    online = raykd.run(job("online", work, seeds, args.epochs, {"kd": kd}, frozen))
    replay = {**frozen, "replay": {"views": args.views, "topk": args.topk}}
    replayed = raykd.run(job("replay", work, seeds, args.epochs, {"ce": {}, "kd": kd}, replay))
    total = time.perf_counter() - started

    out = work / "out"
    ce_s = epoch_seconds(out / "replay", "ce", seeds)
    online_s = epoch_seconds(out / "online", "kd", seeds)
    replay_s = epoch_seconds(out / "replay", "kd", seeds)
    ce, kd_online, kd_replay = (statistics.median(v) for v in (ce_s, online_s, replay_s))

    def test(rows, method):
        return rows[(rows.role == "student") & (rows.method == method)].test_top1

    fill_s = time_fill(job("replay", work, seeds, args.epochs, {"kd": kd}, replay),
                       work / "fill-cache")
    per_image = args.views * (4 * args.topk + 6)
    body = f"""## Replayed teacher views: KD on augmented data at a CE epoch's cost

`.venv/bin/python bench/replay.py --epochs {args.epochs} --views {args.views} --topk {args.topk} --seeds {args.seeds}`; {machine()}.
{TEACHER} teacher (trained once, {args.teacher_epochs} epochs, test top-1 {teacher.test_top1:.4f}) into
{STUDENT} on an image folder of 2,000 real PNG files (mnist5k, 32x32 grey) augmented with the
CIFAR recipe (pad 4, random crop, flip); batch 64, one unit at a time, one CPU each;
{args.epochs} epochs, seeds {seeds}; K = {args.views} stored views per image, top-{args.topk}
of 10 classes (plus the label's), {per_image} bytes per image. Epoch: median over each seed's
epochs, then over seeds.

| | CE | KD, teacher online | KD, replayed views |
| --- | --- | --- | --- |
| training epoch | {ce:.2f} s | {kd_online:.2f} s ({kd_online / ce:.2f}x CE) | {kd_replay:.2f} s (**{kd_replay / ce:.2f}x CE**, {kd_replay / kd_online:.2f}x online) |
| test top-1 | {mean_std(test(replayed, "ce"))} | {mean_std(test(online, "kd"))} | {mean_std(test(replayed, "kd"))} |

Target: a replayed KD epoch at most 1.15x a CE epoch. The store is filled once per teacher, by
the first student that needs it ({args.views} passes of the teacher over the training split,
drawing each view; the teacher's other students and later jobs read it): {fill_s:.1f} s, one
thread, timed again on its own into an empty folder, against {args.seeds} x {args.epochs} epochs
x {kd_online - kd_replay:.2f} s = {args.seeds * args.epochs * (kd_online - kd_replay):.0f} s that replay saved these
students. Whole benchmark: {total:.0f} s.
"""
    write_section("replay", body)
    print(body)


if __name__ == "__main__":
    main()
