"""raykd's KD epoch on one Ray Train worker against a plain PyTorch loop, side by side.

Same student (cnn_small), same frozen teacher (cnn_wide), same data (mnist5k, 3,000 training
images), same batch size, one CPU thread each. Reports the steady-state epoch-time ratio and the
whole-run ratio (which includes Ray Train's fixed start-up and teardown).

    make bench            # or: .venv/bin/python bench/kd_overhead.py [--epochs 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from raykd.data import load_dataset  # noqa: E402
from raykd.driver.units import Unit  # noqa: E402
from raykd.job.specs import DataSpec, OptimSpec  # noqa: E402
from raykd.losses import kd_loss  # noqa: E402
from raykd.models import build_model  # noqa: E402
from raykd.teacher import LocalTeacher, TeacherHandle  # noqa: E402
from raykd.train.batches import evaluate  # noqa: E402
from raykd.train.optim import make_optimizer  # noqa: E402

from results_md import alternating, fresh_workdir, machine, quickstart_teacher, write_section  # noqa: E402


def plain_loop(splits, teacher_path, optim: OptimSpec, data: DataSpec, epochs: int):
    torch.manual_seed(0)
    student = build_model("cnn_small", splits.num_classes, splits.in_channels, splits.image_size)
    teacher = LocalTeacher(teacher_path)
    opt = make_optimizer(student.parameters(), optim)
    epoch_s = []
    started = time.perf_counter()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        student.train()
        for x, y in DataLoader(splits.train, batch_size=data.batch_size, shuffle=True):
            t = teacher.features(x, ["logits"])["logits"]
            s = student(x)
            loss = 0.1 * F.cross_entropy(s, y) + 0.9 * kd_loss(s, t, 4.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch_s.append(time.perf_counter() - t0)
        evaluate(student, splits.val, data.eval_batch_size, "cpu")
    evaluate(student, splits.test, data.eval_batch_size, "cpu")
    return epoch_s, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ray

    from raykd.cluster.ray_env import init_ray
    from raykd.train.runner import RunSettings, fit_units

    torch.set_num_threads(1)
    work = fresh_workdir("kd_overhead")
    data = DataSpec(dataset="mnist5k", batch_size=64)
    optim = OptimSpec(epochs=args.epochs, lr=0.05)
    splits = load_dataset(data)
    teacher_path = quickstart_teacher(work)

    init_ray(num_cpus=2, log_to_driver=False)
    import pandas as pd

    def plain_run() -> tuple[float, float]:
        epochs, total = plain_loop(splits, teacher_path, optim, data, args.epochs)
        return round(statistics.median(epochs), 3), round(total, 1)

    def raykd_run() -> tuple[float, float]:
        n = len(list(work.glob("run-*")))
        run = work / f"run-{n}"
        unit = Unit(key="kd", role="student", label="kd", method_name="kd",
                    method={"temperature": 4.0, "alpha": 0.9},
                    model="cnn_small", optim=optim, data=data, seed=0,
                    export_path=str(run / "student.pt"),
                    history_path=str(run / "metrics" / "kd.jsonl"),
                    teacher_candidates=[str(teacher_path)],
                    # same work as the plain loop: the teacher runs every step (no output cache)
                    teachers=[TeacherHandle(str(teacher_path), "local", cache_dir=None)])
        [row] = ray.get(fit_units.remote([unit], RunSettings(str(run / "ray"), 10, (1, 28, 28),
                                                              max_failures=0)))["kd"]
        history = pd.read_parquet(run / "metrics" / "kd.parquet")
        return round(float(history.epoch_s.median()), 3), round(row["wall_s"], 1)

    runs = alternating({"plain": plain_run, "raykd": raykd_run}, args.repeats)
    ray.shutdown()
    plain_epoch = statistics.median(e for e, _ in runs["plain"])
    raykd_epoch = statistics.median(e for e, _ in runs["raykd"])
    plain_total = statistics.median(t for _, t in runs["plain"])
    raykd_total = statistics.median(t for _, t in runs["raykd"])
    epoch_ratios = [r[0] / p[0] for r, p in zip(runs["raykd"], runs["plain"])]

    body = f"""## KD epoch: raykd on one Ray Train worker vs a plain PyTorch loop

`make bench` (or `.venv/bin/python bench/kd_overhead.py --epochs {args.epochs} --repeats {args.repeats}`); {machine()}.
cnn_small student, frozen cnn_wide teacher, mnist5k (3,000 training images), batch 64, 1 thread
each; {args.repeats} runs of each side in alternating order, medians.

| | plain PyTorch | raykd (one-worker Ray Train run) | ratio raykd / plain |
| --- | --- | --- | --- |
| KD epoch (median epoch of each run, then median over runs) | {plain_epoch:.2f} s | {raykd_epoch:.2f} s | **{raykd_epoch / plain_epoch:.2f}x** (pairs: {min(epoch_ratios):.2f}-{max(epoch_ratios):.2f}) |
| whole run ({args.epochs} epochs + eval) | {plain_total:.1f} s | {raykd_total:.1f} s | {raykd_total / plain_total:.2f}x |

The per-epoch ratio is the cost of raykd's loop itself (method dispatch, named-loss logging,
per-epoch checkpoint). The whole-run ratio adds the run's fixed start-up and teardown
({raykd_total - plain_total:.0f} s here; see "Fixed cost of one Ray Train run"), which a
real-length run amortises and which packed units share.
"""
    write_section("kd_overhead", body)
    print(body)


if __name__ == "__main__":
    main()
