"""The methods comparison: `raykd run jobs/mnist_baselines.yaml` (every method at its paper's
defaults, 5 seeds), summarised per method as test top-1 mean ± std, the paired gain over CE
(mean ± std of the per-seed differences) and how many seeds beat CE; rewrites docs/methods.md's
`baselines` block and bench/RESULTS.md's section.

    .venv/bin/python bench/baselines.py            # about 10 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from results_md import machine, write_block, write_section

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "jobs" / "mnist_baselines.yaml"


def comparison(rows) -> str:
    students = rows[rows.role == "student"]
    test = students.pivot_table(index="seed", columns="method", values="test_top1")
    gain = test.sub(test["ce"], axis=0)
    lines = ["| method | test top-1 (mean ± std) | gain over CE (paired) | seeds above CE |",
             "| --- | --- | --- | --- |"]
    order = test.mean().sort_values(ascending=False).index
    for method in order:
        g = gain[method]
        paired = "" if method == "ce" else f"{g.mean():+.4f} ± {g.std():.4f}"
        above = "" if method == "ce" else f"{int((g > 0).sum())} of {g.notna().sum()}"
        lines.append(f"| `{method}` | {test[method].mean():.4f} ± {test[method].std():.4f} | "
                     f"{paired} | {above} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "runs" / "baselines"))
    args = parser.parse_args()
    started = time.perf_counter()
    raykd = str(Path(sys.executable).parent / "raykd")
    subprocess.run([raykd, "run", str(JOB), f"output_dir={args.out}"], check=True)
    wall = time.perf_counter() - started
    sys.path.insert(0, str(ROOT))
    from raykd.outputs.results import read_results

    rows = read_results(Path(args.out) / "mnist_baselines")
    table = comparison(rows)
    seeds = rows.seed.nunique()
    write_section("baselines", f"""## Methods compared (`jobs/mnist_baselines.yaml`)

`.venv/bin/python bench/baselines.py`; {machine()}; {wall:.0f} s for this invocation (a fresh
folder trains all {len(rows)} rows' units, about 10 minutes here; a finished one is only re-read).
Every method at its paper's defaults on mnist5k (1,000 training images, 8 epochs, cnn_wide
teacher, cnn_small student), {seeds} seeds; test top-1, selection on val only.

{table}
""")
    students = rows[rows.role == "student"]
    means = students.groupby("method").test_top1.mean()
    below = int((means < means["ce"]).sum())
    write_block("baselines", f"""Every method at its paper's defaults on the quickstart's models
(mnist5k, 1,000 training images, 8 epochs; {seeds} seeds; written by
`.venv/bin/python bench/baselines.py` from [`jobs/mnist_baselines.yaml`](../jobs/mnist_baselines.yaml)).
{below} of {len(means) - 1} methods score below CE at these defaults, which their papers set for
CIFAR or ImageNet: the table shows each method running at its paper's settings, not how the
methods rank when tuned here (`raykd sweep`, [sweeps.md](sweeps.md)) or at scale.

{table}""", "docs/methods.md")
    print(table)


if __name__ == "__main__":
    main()
