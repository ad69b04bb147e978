"""The device check (run it where a GPU is lent; CI never does): on one GPU, side by side in one
invocation,

1. images/s of a KD training step through raykd (one Ray Train worker on the GPU, the teacher
   run every step) against a plain PyTorch loop over the same models, data and settings, for
   fp32, bf16, bf16 + channels_last and bf16 + channels_last + torch.compile, on two pairs:
   resnet56 -> resnet20 on CIFAR-shaped 3x32x32 images (batch 128), and torchvision ResNet-50 ->
   ResNet-18 at 3x224x224 (batch 64); synthetic Gaussian images, random weights;
2. four small students (resnet20, CIFAR-shaped) packed on the GPU at 0.25 each, against the
   same four one at a time on the whole GPU (wall seconds of the runs);
3. on augmented CIFAR-shaped data (bench/augmented_gaussian.py: random crops and flips), KD
   images/s through raykd with the teacher run every step against replayed teacher views
   (`teacher.replay`, K = 4, k = 10; the store filled first, its time reported) and against CE.

It writes bench/RESULTS.md's `gpu` section, naming the device. `--quick` runs the same code tiny
(on CPU where there is no GPU) to check the script itself, and writes nothing.

    .venv/bin/python bench/gpu.py            # on the GPU machine, about 5-8 minutes
    .venv/bin/python bench/gpu.py --quick    # anywhere (CPU: about 5 minutes)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from raykd.driver.units import Unit  # noqa: E402
from raykd.job.specs import DataSpec, GaussianSpec, OptimSpec, ReplaySpec  # noqa: E402
from raykd.losses import kd_loss  # noqa: E402
from raykd.models import build_model  # noqa: E402
from raykd.models.export import save_export  # noqa: E402
from raykd.teacher import TeacherHandle  # noqa: E402

from results_md import fresh_workdir, machine, write_section  # noqa: E402

SETTINGS = {"fp32": {}, "bf16": {"precision": "bf16"},
            "bf16 + channels_last": {"precision": "bf16", "channels_last": True},
            "bf16 + channels_last + compile": {"precision": "bf16", "channels_last": True,
                                               "compile": True}}


@dataclass(frozen=True)
class Pair:
    teacher: str
    student: str
    size: int
    batch: int
    samples: int


PAIRS = {"resnet56 -> resnet20, 3x32x32": Pair("resnet56", "resnet20", 32, 128, 8192),
         "ResNet-50 -> ResNet-18, 3x224x224": Pair("torchvision:resnet50", "torchvision:resnet18",
                                                   224, 64, 2048)}
QUICK_SETTINGS = ("fp32", "bf16 + channels_last")
QUICK = {"resnet56 -> resnet20, 3x32x32": Pair("resnet20", "resnet8", 32, 32, 128),
         "ResNet-50 -> ResNet-18, 3x224x224": Pair("torchvision:resnet18", "torchvision:resnet18",
                                                   32, 16, 64)}


def data_spec(pair: Pair) -> DataSpec:
    return DataSpec(dataset="gaussian", batch_size=pair.batch, val_size=pair.batch,
                    test_size=pair.batch, train_size=pair.samples,
                    gaussian=GaussianSpec(channels=3, image_size=pair.size,
                                          samples=pair.samples + 2 * pair.batch))


def plain_images_per_s(pair: Pair, setting: dict, device: torch.device, epochs: int) -> float:
    """A plain loop: the same models and batches, autocast, channels_last, compile by hand."""
    from raykd.data import load_dataset

    splits = load_dataset(data_spec(pair))
    torch.manual_seed(0)
    teacher = build_model(pair.teacher, 10, 3, pair.size).to(device).eval()
    student = build_model(pair.student, 10, 3, pair.size).to(device)
    layout = torch.channels_last if setting.get("channels_last") else torch.contiguous_format
    teacher.to(memory_format=layout)
    student.to(memory_format=layout)
    if setting.get("compile"):
        teacher.compile()
        student.compile()
    dtype = {"bf16": torch.bfloat16}.get(setting.get("precision"))
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=pair.batch, shuffle=True,
                                         drop_last=True, pin_memory=device.type == "cuda")
    rates = []
    for _ in range(epochs):
        seen, started = 0, time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True).contiguous(memory_format=layout)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                with torch.inference_mode():
                    t = teacher(x)
                s = student(x)
            loss = 0.1 * F.cross_entropy(s.float(), y) + 0.9 * kd_loss(s, t.clone(), 4.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - started))
    return rates[-1]          # the last epoch: warm (compiled, autotuned)


def raykd_unit(work: Path, name: str, pair: Pair, setting: dict, teacher: Path,
               epochs: int) -> Unit:
    run = work / name
    optim = replace(OptimSpec(epochs=epochs, lr=0.05), **setting)
    return Unit(key=name, role="student", label="kd", method_name="kd",
                method={"temperature": 4.0, "alpha": 0.9}, model=pair.student, optim=optim,
                data=data_spec(pair), seed=0, export_path=str(run / "student.pt"),
                history_path=str(run / "metrics" / f"{name}.jsonl"),
                teacher_candidates=[str(teacher)],
                teachers=[TeacherHandle(str(teacher), "local", cache_dir=None)])


def fit(units: list[Unit], work: Path, pair: Pair, gpus: float, lanes: int | None = None):
    import ray

    from raykd.train.runner import RunSettings, fit_units

    settings = RunSettings(str(work / "ray"), 10, (3, pair.size, pair.size), gpus_per_worker=gpus,
                           max_failures=0)
    out = ray.get(fit_units.remote(units, settings, lanes=lanes))
    for key, rows in out.items():
        if isinstance(rows, Exception):
            raise RuntimeError(f"{key}: {rows}")


def raykd_images_per_s(work: Path, name: str, pair: Pair, setting: dict, teacher: Path,
                       gpus: float, epochs: int) -> float:
    import pandas as pd

    unit = raykd_unit(work, name, pair, setting, teacher, epochs)
    fit([unit], work, pair, gpus)
    history = pd.read_parquet(Path(unit.history_path).with_suffix(".parquet"))
    return pair.samples / float(history.epoch_s.iloc[-1])


AUGMENTED = "augmented_gaussian:splits"     # bench/augmented_gaussian.py


def replay_rows(work: Path, pair: Pair, teacher: Path, gpus: float, epochs: int,
                workers: int) -> list[str]:
    """CE, KD with the teacher online and KD on replayed views, on augmented data (bf16 +
    channels_last): images/s of each run's last epoch, and the replay store's fill time."""
    import pandas as pd

    data = replace(data_spec(pair), dataset=AUGMENTED, loader_workers=workers,
                   args={"size": pair.size, "samples": pair.samples, "held_out": pair.batch})
    optim = replace(OptimSpec(epochs=epochs, lr=0.05), **SETTINGS["bf16 + channels_last"])
    rates, rows = {}, []
    for name, method, replay in (("ce", "ce", None), ("kd online", "kd", None),
                                 ("kd replayed", "kd", ReplaySpec(views=4, topk=10))):
        key = name.replace(" ", "-")
        unit = Unit(key=key, role="student", label=key, method_name=method,
                    method={"temperature": 4.0, "alpha": 0.9} if method == "kd" else {},
                    model=pair.student, optim=optim, data=data, seed=0,
                    export_path=str(work / key / "student.pt"),
                    history_path=str(work / key / "metrics" / f"{key}.jsonl"),
                    teacher_candidates=[str(teacher)] if method == "kd" else [], replay=replay,
                    teachers=[TeacherHandle(str(teacher), "local", cache_dir=str(work / "cache"))]
                    if method == "kd" else [])
        started = time.perf_counter()
        fit([unit], work, pair, gpus)
        wall = time.perf_counter() - started
        history = pd.read_parquet(Path(unit.history_path).with_suffix(".parquet"))
        rates[name] = pair.samples / float(history.epoch_s.iloc[-1])
        # the run's time outside its epochs: start-up, and for the replaying run the store's fill
        outside = wall - float(history.epoch_s.sum())
        rows.append(f"| {name} | {rates[name]:,.0f} | {rates[name] / rates.get('ce', 1):.2f}x | "
                    f"{outside:.1f} s |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, writes nothing")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()

    import ray

    from raykd.cluster.ray_env import init_ray

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        sys.exit("bench/gpu.py: no GPU here; run it where one is lent (or --quick to check it)")
    gpus = 1.0 if device.type == "cuda" else 0.0
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (quick check)"
    pairs = QUICK if args.quick else PAIRS
    work = fresh_workdir("gpu")
    from raykd.job import factories

    # the replay row's data factory, importable by the Ray processes started below
    factories.allow([AUGMENTED])
    os.environ.update(factories.runtime_env([AUGMENTED])["env_vars"])
    init_ray(log_to_driver=False)
    lines = []
    for label, pair in pairs.items():
        teacher = work / f"{pair.teacher.replace(':', '_')}-{pair.size}.pt"
        torch.manual_seed(0)
        save_export(build_model(pair.teacher, 10, 3, pair.size), teacher, 10, 3, pair.size)
        for setting_name, setting in SETTINGS.items():
            if args.quick and setting_name not in QUICK_SETTINGS:
                continue      # bf16 on a CPU without it is ~20x slower; compiling is slow too
            plain = plain_images_per_s(pair, setting, device, args.epochs)
            ours = raykd_images_per_s(work, f"u{len(lines)}", pair, setting, teacher, gpus,
                                      args.epochs)
            lines.append(f"| {label} | {setting_name} | {plain:,.0f} | {ours:,.0f} | "
                         f"{ours / plain:.2f}x |")
            print(lines[-1], flush=True)
    # four small students packed at 0.25 GPU each against one at a time
    pair = pairs["resnet56 -> resnet20, 3x32x32"]
    teacher = work / f"{pair.teacher.replace(':', '_')}-{pair.size}.pt"
    bf16 = SETTINGS["bf16 + channels_last"]
    started = time.perf_counter()
    for i in range(4):
        fit([raykd_unit(work, f"alone{i}", pair, bf16, teacher, args.epochs)], work, pair, gpus)
    alone_s = time.perf_counter() - started
    started = time.perf_counter()
    # one CPU per lane: four on the GPU machine, as many as there are CPUs on a quick check
    lanes = 4 if gpus else min(4, int(ray.cluster_resources().get("CPU", 1)))
    fit([raykd_unit(work, f"packed{i}", pair, bf16, teacher, args.epochs) for i in range(4)],
        work, pair, gpus / 4, lanes=lanes)
    packed_s = time.perf_counter() - started
    replayed = replay_rows(work, pair, teacher, gpus, args.epochs, 4 if gpus else 0)
    ray.shutdown()
    body = f"""## On a GPU: a KD step through raykd against a plain loop; four students on one GPU

`.venv/bin/python bench/gpu.py{' --quick' if args.quick else ''}`; {name}; {machine()}.
Synthetic Gaussian images, random weights, the teacher run every step; images/s of the last of
{args.epochs} epochs (warm: compiled, autotuned). raykd: one Ray Train worker holding the GPU.

| pair | setting | plain PyTorch (images/s) | raykd (images/s) | raykd / plain |
| --- | --- | --- | --- | --- |
{chr(10).join(lines)}

Four resnet20 students (bf16 + channels_last, {args.epochs} epochs each): one at a time on the
whole GPU {alone_s:.1f} s; packed as {lanes} lanes of one run at 0.25 GPU each {packed_s:.1f} s
(**{alone_s / packed_s:.2f}x** faster).

Augmented data (random crops and flips of the CIFAR-shaped images, 4 loader workers on a GPU),
bf16 + channels_last, resnet20 student; KD from the teacher run every step against replayed
views (K = 4, k = 10: the store is filled once before the first epoch):

| run | images/s | against CE | outside the epochs (start-up, the replay fill) |
| --- | --- | --- | --- |
{chr(10).join(replayed)}
"""
    print(body)
    if not args.quick:
        write_section("gpu", body)


if __name__ == "__main__":
    main()
