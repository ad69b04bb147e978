"""The tuning study: every method tuned on the validation split, then its best configuration over
seeds 0-4, against CE and KD with default settings; rewrites the study table in docs/sweeps.md.

    .venv/bin/python bench/study.py                 # every job (resumes whatever is finished)
    .venv/bin/python bench/study.py --only KD,DIH   # some sweeps; the table is rebuilt from all
    .venv/bin/python bench/study.py --only KD,CD+GKD,DIH --seeds 0,1,2   # tuned on 3 seeds

Each step is a plain `raykd` command (printed before it runs) with `output_dir=runs/study`, so
the teachers (seeds 0-4) are trained once and shared by every job through the teacher store.
Selection reads val only; the table's test column is the best configuration's test accuracy.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from results_md import pm, write_block

ROOT = Path(__file__).resolve().parent.parent
OUT = "runs/study"
BASELINE = "jobs/study_baseline.yaml"
# label in the table -> the sweep job that tunes it (its `sweep.method` is the tuned entry)
SWEEPS = {"KD": "jobs/sweep_kd.yaml", "CD+GKD": "jobs/sweep_cd_gkd.yaml",
          "CD+GKD+EDT": "jobs/sweep_cd.yaml", "DIH": "jobs/sweep_dih.yaml",
          "FEED (2 teachers)": "jobs/sweep_feed.yaml", "KD-topk": "jobs/sweep_tang.yaml",
          "ND (KD fine-tuning)": "jobs/sweep_nd.yaml"}


def raykd(*args: str) -> float:
    command = [sys.executable, "-m", "raykd", *args, f"output_dir={OUT}"]
    print("$ raykd " + " ".join(command[3:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.perf_counter() - started


def student_rows(run_dir: Path, label: str) -> pd.DataFrame:
    df = pd.read_parquet(run_dir / "results.parquet")
    return df[(df.role == "student") & (df.method == label)].sort_values("seed")



def table() -> str:
    base = ROOT / OUT / "study_baseline"
    ce = student_rows(base, "ce").set_index("seed")
    lines = ["| method | tuned on val (seed 0) | trials: finished / stopped early | val_top1 | "
             "test_top1 | test − CE, paired by seed | seeds above CE | params |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def line(name, tuned, trials, rows):
        rows = rows.set_index("seed")
        gain = rows.test_top1 - ce.test_top1.reindex(rows.index)
        lines.append(f"| {name} | {tuned} | {trials} | {pm(rows.val_top1)} | "
                     f"{pm(rows.test_top1)} | {gain.mean():+.4f} ± {gain.std(ddof=1):.4f} | "
                     f"{int((gain > 0).sum())} of {len(gain)} | {int(rows.params.iloc[0]):,} |")

    line("CE", "defaults", "–", student_rows(base, "ce"))
    line("KD (T=4, α=0.9)", "defaults", "–", student_rows(base, "kd"))
    for name, job in SWEEPS.items():
        raw = yaml.safe_load((ROOT / job).read_text())
        run_dir = ROOT / OUT / raw["name"]
        if not (run_dir / "best.yaml").exists():
            lines.append(f"| {name} | not run yet (`{job}`) | | | | | |")
            continue
        label = raw["sweep"]["method"]
        best = yaml.safe_load((run_dir / "best.yaml").read_text())["methods"][label]
        tuned = ", ".join(f"{k.split('.')[-1]}={_short(best.get(k.split('.')[-1]))}"
                          for k in raw["sweep"]["space"] if k.startswith("methods."))
        trials = pd.read_parquet(run_dir / "sweep.parquet")
        counts = f"{(trials.status == 'finished').sum()} / {(trials.status == 'stopped').sum()}"
        line(name, tuned, counts, student_rows(run_dir, label))
    from raykd.data import load_dataset
    from raykd.job.config import load_job

    val_images = len(load_dataset(load_job(ROOT / BASELINE).data).val)
    p = float(ce.val_top1.mean())
    lines += ["", f"One seed's val split has {val_images} images: a val_top1 near {p:.2f} is "
              f"known to ± {(p * (1 - p) / val_images) ** 0.5:.4f} (one standard error), larger "
              "than most differences between the trials a sweep ranks."]
    return "\n".join(lines)


def seeds_table(chosen: list[str], seeds: list[int]) -> str:
    """The chosen sweeps tuned on the mean val_top1 of `seeds` (`sweep.seeds`), each best
    configuration then over seeds 0-4 as in the main table."""
    base = ROOT / OUT / "study_baseline"
    ce = student_rows(base, "ce").set_index("seed")
    lines = [f"| method | tuned on mean val (seeds {','.join(map(str, seeds))}) | trials | "
             "trial val_top1 (mean ± std over its seeds) | test_top1 | test − CE, paired by seed "
             "| seeds above CE |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in chosen:
        raw = yaml.safe_load((ROOT / SWEEPS[name]).read_text())
        run_dir = ROOT / OUT / seeds_name(raw["name"], seeds)
        label = raw["sweep"]["method"]
        best = yaml.safe_load((run_dir / "best.yaml").read_text())["methods"][label]
        tuned = ", ".join(f"{k.split('.')[-1]}={_short(best.get(k.split('.')[-1]))}"
                          for k in raw["sweep"]["space"] if k.startswith("methods."))
        trials = pd.read_parquet(run_dir / "sweep.parquet")
        top = trials.sort_values("last_val_top1", ascending=False).iloc[0]
        rows = student_rows(run_dir, label).set_index("seed")
        gain = rows.test_top1 - ce.test_top1.reindex(rows.index)
        lines.append(f"| {name} | {tuned} | {len(trials)} | {top.last_val_top1:.4f} ± "
                     f"{top.last_val_top1_std:.4f} | {pm(rows.test_top1)} | "
                     f"{gain.mean():+.4f} ± {gain.std(ddof=1):.4f} | "
                     f"{int((gain > 0).sum())} of {len(gain)} |")
    return "\n".join(lines)


def seeds_name(name: str, seeds: list[int]) -> str:
    return f"{name}_seeds{''.join(map(str, seeds))}"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated table labels of the sweeps to run "
                        f"({', '.join(SWEEPS)}); default all")
    parser.add_argument("--table-only", action="store_true",
                        help="rebuild the docs/sweeps.md table from what has run, run nothing")
    parser.add_argument("--seeds", metavar="S,S,...",
                        help="tune each chosen sweep on the mean over these seeds instead "
                             "(sweep.seeds, FIFO) and write the study_seeds table")
    args = parser.parse_args()
    chosen = list(SWEEPS) if not args.only else [s.strip() for s in args.only.split(",")]
    unknown = [c for c in chosen if c not in SWEEPS]
    if unknown:
        sys.exit(f"study.py: unknown sweep {unknown}; choose from {', '.join(SWEEPS)}")
    if args.seeds:
        seeds = [int(x) for x in args.seeds.split(",")]
        if not args.table_only:
            raykd("run", BASELINE)
            for name in chosen:
                job = yaml.safe_load((ROOT / SWEEPS[name]).read_text())
                raykd("sweep", SWEEPS[name], f"name={seeds_name(job['name'], seeds)}",
                      f"sweep.seeds={seeds}", "sweep.scheduler=fifo")
        body = seeds_table(chosen, seeds)
        print(body)
        write_block("study_seeds", body, "docs/sweeps.md")
        return 0
    if not args.table_only:
        walls = {"baseline": raykd("run", BASELINE)}
        for name in chosen:
            walls[name] = raykd("sweep", SWEEPS[name])
        print("wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()))
    body = table()
    print(body)
    write_block("study", body, "docs/sweeps.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
