"""Fixed cost of Ray Train for small independent units (neighbourhoods, heads): N separate
TorchTrainer runs of one worker each, launched concurrently, against one TorchTrainer run whose N
workers each do one unit's work. The work is the same trivial loop in both, so the difference is
the start-up and teardown that each layout wastes.

    .venv/bin/python bench/unit_packing.py [--units 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import machine, write_section  # noqa: E402


def unit_work(config: dict) -> None:
    import ray.train
    import torch

    torch.set_num_threads(1)
    model = torch.nn.Linear(64, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):
        loss = model(torch.randn(64, 64)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with tempfile.TemporaryDirectory() as d:
        torch.save(model.state_dict(), f"{d}/unit.pt")
        ray.train.report({"loss": float(loss)}, checkpoint=ray.train.Checkpoint.from_directory(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raykd.ray_env import init_ray

    work = Path(__file__).resolve().parent / "runs" / "unit_packing"
    shutil.rmtree(work, ignore_errors=True)
    init_ray(num_cpus=args.units, log_to_driver=False)

    @ray.remote(num_cpus=0)
    def fit(name: str, workers: int) -> None:
        TorchTrainer(unit_work, scaling_config=ScalingConfig(num_workers=workers),
                     run_config=RunConfig(name=name, storage_path=str(work))).fit()

    separate, packed = [], []
    for r in range(args.repeats):
        started = time.perf_counter()
        ray.get([fit.remote(f"sep{r}-{i}", 1) for i in range(args.units)])
        separate.append(time.perf_counter() - started)
        started = time.perf_counter()
        ray.get(fit.remote(f"packed{r}", args.units))
        packed.append(time.perf_counter() - started)
        print(f"separate {separate[-1]:.1f} s, packed {packed[-1]:.1f} s", flush=True)
    ray.shutdown()
    s, p = statistics.median(separate), statistics.median(packed)
    body = f"""## Small units: separate Ray Train runs vs the workers of one run

`.venv/bin/python bench/unit_packing.py --units {args.units} --repeats {args.repeats}`; {machine()}.
{args.units} units of the same trivial work (200 SGD steps of a linear layer, one checkpoint each):

| layout | wall time (median of {args.repeats}) |
| --- | --- |
| {args.units} TorchTrainer runs x 1 worker, concurrent | {s:.1f} s |
| 1 TorchTrainer run x {args.units} workers, one unit each | {p:.1f} s |

separate / packed: **{s / p:.2f}x**. raykd runs every neighbourhood unit and every head group as
its own run: each then has its own checkpoint, retry and resume by name, and a unit that fails
never restarts the others (in one run, a worker failure restarts the whole worker group).
The start-up difference above is what that costs per batch of concurrent units.
"""
    write_section("unit_packing", body)
    print(body)


if __name__ == "__main__":
    main()
