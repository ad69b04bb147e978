"""Architecture search on mnist5k, end to end, against training the same students end to end.

    .venv/bin/python bench/search.py

1. the library: `raykd run jobs/search_library.yaml` (3 positions x 5 candidates, 15 runs);
2. the search: `raykd search LIB --teacher T --max-params 250000 --top 5 --finetune-epochs 4
   --seeds 0,1,2` (no neighbourhood retrained; the chosen student fine-tuned with KD);
3. the baseline: each of the K searched architectures trained end to end with KD from a fresh
   initialisation (`raykd run OUT/student.yaml student.checkpoint=OUT/solutions/rankI.pt
   student.reinit=true student.train.epochs=8`), seed 0, and seeds 1-2 for the chosen one,
   two runs at a time as in steps 1-2.
Everything runs in one process on one local Ray instance, so each side pays the same start-up.
Writes the `search` section of bench/RESULTS.md and the search block of docs/search.md; the Pareto
plot is copied to docs/search_pareto.png, which that block shows.
"""
from __future__ import annotations

import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import machine, markdown_table, pm, write_block, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "search_demo"
MAX_PARAMS, TOP, FINETUNE, E2E_EPOCHS = 250_000, 5, 4, 8



def main() -> int:
    from raykd.cluster.ray_env import init_ray
    from raykd.driver.pipeline import run_job
    from raykd.job.config import job_from_dict, load_job
    from raykd.nas.search import SearchRequest, run_search

    shutil.rmtree(OUT, ignore_errors=True)
    init_ray(None, None)
    started = time.perf_counter()
    library_job = load_job(ROOT / "jobs" / "search_library.yaml", [f"output_dir={OUT}"])
    built = run_job(library_job)
    library_s = time.perf_counter() - started
    teacher = built[built.role == "teacher"].export.iloc[0]
    library = OUT / "neighbourhoods"

    started = time.perf_counter()
    table, tuned = run_search(SearchRequest(
        str(library), teacher, max_params=MAX_PARAMS, top=TOP, finetune_epochs=FINETUNE,
        seeds=(0, 1, 2), out=str(OUT / "search")))
    search_s = time.perf_counter() - started

    # the same architectures, end to end with KD from fresh weights, two at a time
    chosen_rank = int(table[table.chosen]["rank"].iloc[0])
    jobs = []
    for rank in table["rank"]:
        raw = yaml.safe_load((OUT / "search" / "student.yaml").read_text())
        raw.update(name=f"e2e_rank{rank}", seeds=[0, 1, 2] if rank == chosen_rank else [0])
        raw["student"] = {"checkpoint": str(OUT / "search" / "solutions" / f"rank{rank}.pt"),
                          "reinit": True, "train": {"epochs": E2E_EPOCHS, "lr": 0.05}}
        jobs.append(job_from_dict(raw))
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        e2e = list(pool.map(run_job, jobs))
    e2e_s = time.perf_counter() - started

    parts = built[built.role == "neighbourhood"]
    ft = tuned[tuned.method == "kd"]
    scratch = e2e[list(table["rank"]).index(chosen_rank)]
    scratch = scratch[scratch.method == "kd"]
    chosen = table[table.chosen].iloc[0]
    possible = 1
    for count in parts.groupby("neighbourhood").size():
        possible *= int(count)
    teacher_s = float(built[built.role == "teacher"].wall_s.iloc[0])
    pareto = markdown_table(table.drop(columns=["positions"]))
    shutil.copyfile(OUT / "search" / "pareto.png", ROOT / "docs" / "search_pareto.png")
    body = f"""## Architecture search over a neighbourhood library (mnist5k)

`.venv/bin/python bench/search.py`; {machine()}.
Library: `jobs/search_library.yaml`, the cnn_wide teacher ({int(parts.teacher_params.iloc[0]):,}
parameters) split at its 3 stages, 5 candidates each (w0.25d1, w0.5d1, w0.5d2, dw1d1, dw2d1):
{len(parts)} Ray Train runs, {possible} possible students. Search: at most
{MAX_PARAMS:,} parameters, top {TOP} by summed reconstruction error, scored on val, the best
fine-tuned with KD for {FINETUNE} epochs over seeds 0-2.

Top {TOP} solutions (val accuracy of the stitched student before fine-tuning; latency: batch 1,
one CPU thread, measured):

{pareto}

| student ({chosen.candidates}, {int(chosen.params):,} params) | seeds | val_top1 | test_top1 |
| --- | --- | --- | --- |
| searched, stitched, KD fine-tuned {FINETUNE} epochs | 3 | {pm(ft.val_top1)} | {pm(ft.test_top1)} |
| same architecture, KD end to end from scratch, {E2E_EPOCHS} epochs | 3 | {pm(scratch.val_top1)} | {pm(scratch.test_top1)} |

| wall time (one process, one local Ray instance) | s |
| --- | --- |
| library build (teacher {teacher_s:.0f} s + {len(parts)} neighbourhood runs + stitched evaluation) | {library_s:.0f} |
| search: solve, score {TOP} students in Ray tasks, export, fine-tune 3 seeds | {search_s:.0f} |
| **search total** | **{library_s + search_s:.0f}** |
| the {TOP} architectures end to end with KD ({E2E_EPOCHS} epochs; seed 0, seeds 1-2 of the chosen), teacher reused | {e2e_s:.0f} |

The library is paid once: a second search under another budget costs only the search line.
"""
    write_section("search", body)
    plot = ("![Pareto plot of the searched students: val accuracy against parameters, MACs and "
            "latency](search_pareto.png)")
    without_heading = body.split("\n", 1)[1]
    write_block("search", f"{plot}\n\n{without_heading}", "docs/search.md")
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
