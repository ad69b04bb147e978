"""The quickstart, timed as a newcomer runs it (`raykd run jobs/quickstart.yaml`, a fresh output
folder, command to exit), and optionally the same job at an earlier commit of raykd on the same
machine, alternating. Rewrites the README's quickstart table and timing (its "What you get" block)
and its RESULTS section.

    .venv/bin/python bench/quickstart.py [--against COMMIT] [--repeats 1]

`--against` checks COMMIT out into a temporary git worktree and runs its code with this venv
(PYTHONPATH first), so both sides share Python, torch and Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import fresh_workdir, machine, median_spread, now_and_then, write_block, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(Path(sys.executable).parent / "python")


def timed_run(code: Path, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_AUTH_MODE": "disabled"}
    started = time.perf_counter()
    subprocess.run([PYTHON, "-m", "raykd", "run", str(ROOT / "jobs" / "quickstart.yaml"),
                    f"output_dir={out}"], check=True, capture_output=True, env=env, cwd=code)
    return round(time.perf_counter() - started, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="an earlier commit to time on the same machine")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the text from the last measurement, running nothing")
    args = ap.parse_args()


    if args.report_only:     # rebuild the text from the last measurement's folders and times
        work = Path(__file__).resolve().parent / "runs" / "quickstart"
        report(work, json.loads((work / "walls.json").read_text()), args.against)
        return
    work = fresh_workdir("quickstart")
    count = {"now": 0, "before": 0}

    def measure(side: str, code: Path) -> float:
        count[side] += 1
        return timed_run(code, work / f"{side}-{count[side]}")

    walls = now_and_then(measure, args.against, args.repeats)
    (work / "walls.json").write_text(json.dumps(walls))
    report(work, walls, args.against)


NOISE = 0.005   # a row mean over 3 seeds moving by more than this is reported by name


def report(work: Path, walls: dict, against: str | None) -> None:
    from raykd.outputs.results import format_summary, read_results

    rows = read_results(work / "now-1" / "quickstart")
    table = format_summary(rows)
    units = rows.unit.nunique()
    now = statistics.median(walls["now"])
    before = ""
    ratio = ""
    if "before" in walls:
        then = statistics.median(walls["before"])
        old_rows = read_results(work / "before-1" / "quickstart")
        means = [frame.groupby(["role", "method"]).test_top1.mean() for frame in (rows, old_rows)]
        diff = (means[0] - means[1]).dropna()
        # rows grouped by the job entry they come from (nd's parts and stitched rows are "nd"):
        # an entry whose code changed since then shows as a group, the rest should stay put
        entry = diff.index.get_level_values("method").str.split(r"[:.]").str[0]
        largest = diff.abs().groupby(entry).max().sort_values(ascending=False)
        moved = [e for e, gap in largest.items() if gap > NOISE]
        parts = []
        for e in moved:
            top = diff[entry == e].abs().idxmax()
            parts.append(f"{e} rows by up to {diff[top]:+.4f} ({top[1]}: now "
                         f"{means[0][top]:.4f}, then {means[1][top]:.4f})")
        still = largest.drop(moved)
        ratio = (f" At commit `{against[:7]}`, before packed runs, the same job took {then:.0f} s on "
                 f"the same machine in the same invocation: now / then **{now / then:.2f}x**; "
                 f"mean test accuracy against then: "
                 + ("; ".join(parts) + "; " if parts else "")
                 + f"every {'other ' if parts else ''}row within {(still.max() if len(still) else 0.0):.4f}.")
        before = (f"\nAt commit `{against[:7]}`, on the same machine in the same invocation: "
                  f"{median_spread(walls['before'])}; now / then **{now / then:.2f}x**.\n\n"
                  f"Test accuracy then (mean over seeds), per method: " + ", ".join(
                      f"{m} {v:.4f}" for m, v in old_rows[old_rows.role == 'student']
                      .groupby('method').test_top1.mean().items()) + ".\n")
    body = f"""## The quickstart (`make demo`)

`.venv/bin/python bench/quickstart.py{' --against ' + against[:7] if against else ''}`; {machine()}.
`raykd run jobs/quickstart.yaml` from command to exit, fresh output folder: {median_spread(walls['now'])}
({units} units, {len(rows)} results rows).
{before}
```
{table}
```
"""
    write_section("quickstart", body)
    write_block("quickstart", f"""`make demo` runs [`jobs/quickstart.yaml`](jobs/quickstart.yaml) and ends with this table
({units} units; {now:.0f} s from command to exit on a 2-core CPU machine, measured by
`.venv/bin/python bench/quickstart.py`, which rewrites this block; mean ± std over seeds 0, 1, 2;
every method at its tuned settings; accuracies are fractions; `nd.stitched` is the stitched
student before its KD fine-tuning).{ratio}

```
{table}
```""")
    print(body)


if __name__ == "__main__":
    main()
