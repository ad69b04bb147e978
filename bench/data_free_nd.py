"""Neighbourhood Distillation without data against with data: `jobs/mnist_neighbourhood.yaml`
(3 seeds) with its parts distilled on training images, and again on synthetic inputs
(`inputs: gaussian`, raykd.train.synthetic), the stitched students compared on test; rewrites
docs/methods.md's `data_free_nd` block and bench/RESULTS.md's section.

    .venv/bin/python bench/data_free_nd.py                    # about 10 minutes on 2 CPU cores
    .venv/bin/python bench/data_free_nd.py --against REV      # plus REV's synthetic inputs

Runs (one output folder, so the teacher of each seed is trained once and shared):
  data       the job as it is: parts on training images, the stitched student's BatchNorm
             recomputed on 2,048 training images, then 3 epochs of KD fine-tuning
  gaussian   parts on synthetic inputs; nothing else: no training image is read
  gaussian + recalibration   the same parts (from the library), the stitched student's
             BatchNorm recomputed on 2,048 training images (its only read of training data)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_md import machine, pm, write_block, write_section

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "jobs" / "mnist_neighbourhood.yaml"
GAUSSIAN = ["methods.nd.inputs=gaussian", "methods.nd.finetune_epochs=0",
            "methods.nd.scratch_epochs=0"]
RUNS = {   # name -> (overrides, parts' inputs, stitched student's BatchNorm, training images read)
    "data": (["methods.nd.scratch_epochs=0"], "training images", "recomputed on 2,048 images",
             "all"),
    "gaussian": (GAUSSIAN + ["methods.nd.bn_recalibration=0"], "synthetic", "its parts' own",
                 "none"),
    "gaussian_recalibrated": (GAUSSIAN + ["methods.nd.bn_recalibration=2048"], "synthetic",
                              "recomputed on 2,048 images", "2,048, no gradient"),
}


def run(code: Path, out: Path, name: str, overrides: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "raykd", "run", str(JOB), f"output_dir={out}",
                    f"name={name}", *overrides], check=True, cwd=code,
                   env={**os.environ, "PYTHONPATH": str(code)})


def stitched(out: Path, name: str):
    from raykd.outputs.results import read_results

    rows = read_results(out / name).set_index("method")
    return rows.loc[["nd.stitched"]], rows.loc[["nd"]] if "nd" in rows.index else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "runs" / "data_free_nd"))
    parser.add_argument("--against", metavar="REV",
                        help="also distil the parts on REV's synthetic inputs (a git revision)")
    args = parser.parse_args()
    out = Path(args.out)
    sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    for name, (overrides, *_rest) in RUNS.items():
        run(ROOT, out, name, overrides)
    lines = ["| parts distilled on | stitched student's BatchNorm | training images read | "
             "stitched, test top-1 | after 3 epochs of KD |", "| --- | --- | --- | --- | --- |"]
    for name, (_, inputs, norm, reads) in RUNS.items():
        first, tuned = stitched(out, name)
        after = pm(tuned.test_top1) if tuned is not None else "(not fine-tuned)"
        lines.append(f"| {inputs} | {norm} | {reads} | {pm(first.test_top1)} | {after} |")
    if args.against:
        with tempfile.TemporaryDirectory() as tmp:
            old = Path(tmp) / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                            args.against], check=True, capture_output=True)
            try:
                run(old, Path(tmp) / "runs", "gaussian", GAUSSIAN + [
                    "methods.nd.bn_recalibration=0"])
                first, _ = stitched(Path(tmp) / "runs", "gaussian")
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(old)], capture_output=True)
        lines.append(f"| synthetic, as {args.against} drew it | its parts' own | none | "
                     f"{pm(first.test_top1)} | (not fine-tuned) |")
    table = "\n".join(lines)
    wall = time.perf_counter() - started
    write_section("data_free_nd", f"""## Neighbourhood Distillation without data

`.venv/bin/python bench/data_free_nd.py{' --against ' + args.against if args.against else ''}`;
{machine()}; {wall:.0f} s for this invocation (a re-run trains only what its folder lacks).
`jobs/mnist_neighbourhood.yaml` (cnn_wide teacher on mnist5k, 1,000 training images; 2
candidates per stage, 10 epochs each), seeds 0-2, mean ± std of test top-1. Recomputing the
data-free student's BatchNorm statistics on real images lowers its accuracy here: its parts
learned on synthetic inputs and are fit to the statistics those produce.

{table}
""")
    write_block("data_free_nd", f"""What distilling without data costs in accuracy on
[`mnist_neighbourhood`](../jobs/mnist_neighbourhood.yaml) (3 seeds; written by
`.venv/bin/python bench/data_free_nd.py`):

{table}""", "docs/methods.md")
    print(table)


if __name__ == "__main__":
    main()
