"""What a Ray Train run's fixed cost is made of, measured side by side: a run whose worker
function imports torch (as every raykd worker does first) and returns, timed from `fit()` to the
first worker having imported torch (start-up) and from the last to `fit()` returning (teardown);
with `TorchTrainer` (which also sets up a torch process group across the workers), with Train
V2's plain `DataParallelTrainer` (no process group), and with the `DataParallelTrainer` raykd
runs (raykd.train.ray_internals.without_datasets: no Ray Data dataset manager, a process per run); with
1 and 2 workers. Plus a fresh Python's `import torch` and `import ray.train.torch`, which every
worker process pays. And the CPU the whole machine spent on each run (every process: Train's
controller, its placement-group cleaner and synchronisation actor, the workers, Ray's own
services), which bounds how many runs two cores start side by side. Repetitions alternate;
medians with min-max.

    .venv/bin/python bench/startup.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import alternating, busy_cpu_s, machine, median_spread, write_section  # noqa: E402


def stamp(config: dict) -> None:
    import ray.train
    import torch  # noqa: F401  (what every raykd worker imports first; the 2 cores are shared)

    rank = ray.train.get_context().get_world_rank()
    Path(config["dir"], f"in-{rank}").write_text(repr(time.time()))


def import_time(module: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return round(time.perf_counter() - started, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from raykd.cluster.ray_env import init_ray, set_ray_env
    set_ray_env()   # before ray is imported: Ray reads its loopback-only mode at import

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from raykd.train.runner import trainer_class

    raykd_trainer = trainer_class(1)

    init_ray(num_cpus=2, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="raykd-startup-")
    parts: dict[str, list[tuple[float, float, float]]] = {}

    def run(cls, workers: int, name: str):
        def go() -> float:
            d = tempfile.mkdtemp(dir=storage)
            cpu = busy_cpu_s()
            started = time.time()
            cls(stamp, train_loop_config={"dir": d},
                scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=Path(d).name, storage_path=storage)).fit()
            ended = time.time()
            first = min(float(p.read_text()) for p in Path(d).glob("in-*"))
            last = max(float(p.read_text()) for p in Path(d).glob("in-*"))
            time.sleep(1.0)     # the run's actor processes exit
            parts.setdefault(name, []).append((first - started, ended - last,
                                               busy_cpu_s() - cpu))
            return round(ended - started, 2)
        return go

    walls = alternating({
        "TorchTrainer, 1 worker": run(TorchTrainer, 1, "TorchTrainer, 1 worker"),
        "DataParallelTrainer, 1 worker": run(DataParallelTrainer, 1, "DataParallelTrainer, 1 worker"),
        "TorchTrainer, 2 workers": run(TorchTrainer, 2, "TorchTrainer, 2 workers"),
        "DataParallelTrainer, 2 workers": run(DataParallelTrainer, 2, "DataParallelTrainer, 2 workers"),
        "raykd's DataParallelTrainer (no dataset manager), 1 worker": run(raykd_trainer, 1, "raykd's DataParallelTrainer (no dataset manager), 1 worker"),
        "raykd's DataParallelTrainer (no dataset manager), 2 workers": run(raykd_trainer, 2, "raykd's DataParallelTrainer (no dataset manager), 2 workers"),
    }, args.repeats)
    imports = alternating({"import torch": lambda: import_time("torch"),
                           "import ray.train.torch": lambda: import_time("ray.train.torch")},
                          args.repeats)
    rows = "\n".join(
        f"| {name} | {median_spread(w)} | {median_spread([p[0] for p in parts[name]])} | "
        f"{median_spread([p[1] for p in parts[name]])} | "
        f"{median_spread([round(p[2], 1) for p in parts[name]])} |" for name, w in walls.items())
    body = f"""## Fixed cost of one Ray Train run

`.venv/bin/python bench/startup.py --repeats {args.repeats}`; {machine()}.
A run whose worker function imports torch and returns (each cell: median (min-max) of {args.repeats}).

| run | fit() wall | start-up: fit() to the first worker having imported torch | teardown: from the last to fit() returning | CPU, whole machine: fit() and 1 s after |
| --- | --- | --- | --- | --- |
{rows}

A fresh Python process, which each Ray worker is: `import torch` {median_spread(imports['import torch'])},
`import ray.train.torch` {median_spread(imports['import ray.train.torch'])}.

raykd pays this once per *pack*, not once per unit: a pack's lanes train one unit after
another inside one run, and units join it as they become ready. The CPU column is why the test
suite's time is about its number of Train runs on two cores: a run keeps more than one core busy
while it starts (each of its actor processes imports Ray Train, and the workers torch), so two
runs side by side take about as long as one after the other.
"""
    write_section("startup", body)
    print(body)


if __name__ == "__main__":
    main()
