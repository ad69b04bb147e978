"""Bring-your-own models: raykd's KD epoch of a timm teacher into a torchvision student, through
the models cut into blocks by torch.fx, against a plain PyTorch loop over the original modules.

Same models (timm:resnet10t teacher, torchvision:shufflenet_v2_x0_5 student, random
weights), same image folder of real PNG files (mnist5k written by `raykd data export`, 32x32 grey,
2,000 training images), same batch size, one CPU thread each, the teacher run on every step (no
output cache). Target: at most 1.05x per epoch.

    .venv/bin/python bench/byo_overhead.py [--epochs 3] [--repeats 3]
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
from raykd.data.folder import export_folder  # noqa: E402
from raykd.driver.units import Unit  # noqa: E402
from raykd.job.specs import DataSpec, OptimSpec  # noqa: E402
from raykd.losses import kd_loss  # noqa: E402
from raykd.models import build_model  # noqa: E402
from raykd.models.export import save_export  # noqa: E402
from raykd.teacher import TeacherHandle  # noqa: E402
from raykd.train.batches import evaluate  # noqa: E402
from raykd.train.optim import make_optimizer  # noqa: E402

from results_md import alternating, fresh_workdir, machine, write_section  # noqa: E402

TEACHER, STUDENT, ARGS = "timm:resnet10t", "torchvision:shufflenet_v2_x0_5", {}


def original(name: str, args: dict, channels: int):
    """The model as its package builds it (not cut): what a plain loop runs."""
    import timm
    import torchvision

    from raykd.models.sources import first_conv_takes

    source, arch = name.split(":")
    if source == "timm":
        return timm.create_model(arch, pretrained=False, num_classes=10, in_chans=channels, **args)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10, **args)
    first_conv_takes(model, channels)
    return model


def plain_loop(splits, optim: OptimSpec, data: DataSpec, epochs: int):
    torch.manual_seed(0)
    teacher = original(TEACHER, {}, splits.in_channels).eval()
    student = original(STUDENT, ARGS, splits.in_channels)
    opt = make_optimizer(student.parameters(), optim)
    epoch_s = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        student.train()
        for x, y in DataLoader(splits.train, batch_size=data.batch_size, shuffle=True):
            with torch.no_grad():
                t = teacher(x)
            s = student(x)
            loss = 0.1 * F.cross_entropy(s, y) + 0.9 * kd_loss(s, t, 4.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch_s.append(time.perf_counter() - t0)
        evaluate(student, splits.val, data.eval_batch_size, "cpu")
    return epoch_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import pandas as pd
    import ray

    from raykd.cluster.ray_env import init_ray
    from raykd.train.runner import RunSettings, fit_units

    torch.set_num_threads(1)
    work = fresh_workdir("byo_overhead")
    export_folder("mnist5k", work / "png", limit=2600)
    data = DataSpec(dataset="imagefolder", root=str(work / "png"), image_size=32, batch_size=64,
                    train_size=2000, val_size=300, test_size=300, augment="none")
    optim = OptimSpec(epochs=args.epochs, lr=0.05)
    splits = load_dataset(data)
    teacher_path = work / "teacher.pt"
    torch.manual_seed(0)
    save_export(build_model(TEACHER, 10, splits.in_channels, 32), teacher_path, 10,
                splits.in_channels, 32)
    init_ray(num_cpus=2, log_to_driver=False)

    def plain_run() -> float:
        return round(statistics.median(plain_loop(splits, optim, data, args.epochs)), 3)

    def raykd_run() -> float:
        run = work / f"run-{len(list(work.glob('run-*')))}"
        unit = Unit(key="kd", role="student", label="kd", method_name="kd",
                    method={"temperature": 4.0, "alpha": 0.9}, model=STUDENT, model_args=ARGS,
                    optim=optim, data=data, seed=0, export_path=str(run / "student.pt"),
                    history_path=str(run / "metrics" / "kd.jsonl"),
                    teacher_candidates=[str(teacher_path)],
                    teachers=[TeacherHandle(str(teacher_path), "local", cache_dir=None)])
        ray.get(fit_units.remote([unit], RunSettings(str(run / "ray"), 10, splits.input_shape,
                                                     max_failures=0)))
        history = pd.read_parquet(run / "metrics" / "kd.parquet")
        return round(float(history.epoch_s.median()), 3)

    runs = alternating({"plain": plain_run, "raykd": raykd_run}, args.repeats)
    ray.shutdown()
    plain, ours = statistics.median(runs["plain"]), statistics.median(runs["raykd"])
    ratios = [r / p for r, p in zip(runs["raykd"], runs["plain"])]
    body = f"""## Bring-your-own models: a KD epoch through the fx-cut models vs a plain loop

`.venv/bin/python bench/byo_overhead.py --epochs {args.epochs} --repeats {args.repeats}`; {machine()}.
{TEACHER} teacher into {STUDENT} ({ARGS}) on an image folder of 2,000 real PNG files (mnist5k,
32x32 grey), batch 64, the teacher run every step, one thread each; {args.repeats} runs of each
side in alternating order, medians of each run's median epoch.

| | plain PyTorch (the packages' own modules) | raykd (one Ray Train worker, models cut into blocks) | ratio |
| --- | --- | --- | --- |
| KD epoch | {plain:.2f} s | {ours:.2f} s | **{ours / plain:.2f}x** (pairs: {min(ratios):.2f}-{max(ratios):.2f}) |

Target: at most 1.05x. The cut models run the same operations in the same order as the
originals (each block is a torch.fx GraphModule of the traced forward pass).
"""
    write_section("byo_overhead", body)
    print(body)


if __name__ == "__main__":
    main()
