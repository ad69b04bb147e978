"""Evaluation batch size on CPU: no-grad forward passes over the same images in batches of
64 to 512, per model of the shipped jobs, on one torch thread (as a lane of a pack runs).

Evaluation (every epoch's validation, the final test, teacher-cache fills) is a large part of a
small unit's time, and large batches of wide convolutions spill out of the CPU's caches.

    .venv/bin/python bench/eval_batch.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from results_md import machine, median_spread, write_section

MODELS = [("cnn_wide", 1, 28), ("cnn", 1, 28), ("cnn_small", 1, 28), ("resnet8x4", 3, 32),
          ("wrn_16_2", 3, 32)]
BATCHES = [64, 128, 256, 512]
IMAGES = 1536


def forward_s(model, images: torch.Tensor, batch: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(images), batch):
            model(images[lo:lo + batch])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from raykd.models import build_model

    torch.set_num_threads(1)
    rows = []
    for name, channels, size in MODELS:
        model = build_model(name, 10, channels, size).eval()
        images = torch.randn(IMAGES, channels, size, size, generator=torch.Generator().manual_seed(0))
        forward_s(model, images[:64], 64)   # warm-up
        times: dict[int, list[float]] = {b: [] for b in BATCHES}
        for i in range(args.repeats):       # alternating order, so drift hits every size alike
            for batch in BATCHES if i % 2 == 0 else BATCHES[::-1]:
                times[batch].append(forward_s(model, images, batch))
        best = min(BATCHES, key=lambda b: sorted(times[b])[len(times[b]) // 2])
        print(name, {b: round(sorted(t)[len(t) // 2], 2) for b, t in times.items()}, flush=True)
        rows.append(f"| {name} ({channels}x{size}x{size}) | " + " | ".join(
            median_spread(times[b]) for b in BATCHES) + f" | {best} |")
    header = "| model | " + " | ".join(f"batch {b}" for b in BATCHES) + " | fastest |"
    write_section("eval_batch", f"""
## Evaluation batch size on one CPU thread

`.venv/bin/python bench/eval_batch.py --repeats {args.repeats}`; {machine()}.
No-grad forward passes over {IMAGES:,} random images, one torch thread (as one lane of a pack),
median (min-max) of {args.repeats} repetitions in alternating order. raykd's default
`data.eval_batch_size` is 64.

{header}
| --- |{" --- |" * (len(BATCHES) + 1)}
{chr(10).join(rows)}
""")


if __name__ == "__main__":
    main()
