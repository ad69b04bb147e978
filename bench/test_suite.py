"""The test suite's wall time (what `make test` runs after its install and lint), now and at an
earlier commit on the same machine, alternating. Rewrites the test-suite block of docs/benchmarks.md and
its RESULTS section.

    .venv/bin/python bench/test_suite.py [--against COMMIT] [--repeats 1]

`--against` checks COMMIT out into a temporary git worktree and runs its tests with this venv
(PYTHONPATH first), so both sides share Python, torch and Ray; the suites differ in what they
test (each side runs its own tests). About 25 minutes per suite on 2 cores (377 tests).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import (  # noqa: E402
    busy_cpu_s,
    fresh_workdir,
    machine,
    median_spread,
    now_and_then,
    write_block,
    write_section,
)

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(Path(sys.executable).parent / "python")
SLOWEST = 8
COSTLIEST_FILES = 12


def timed_suite(code: Path, log: Path) -> dict:
    """Run `pytest` in `code`; return its wall time, the CPU the whole machine spent meanwhile
    (the suite is CPU-bound on 2 cores: its time is what its Ray processes cost), its counts, its
    slowest tests and each test file's seconds (set-up, call and teardown of its tests)."""
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_AUTH_MODE": "disabled"}
    started, cpu = time.perf_counter(), busy_cpu_s()
    done = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--durations=0", "--durations-min=0"],
                          capture_output=True, text=True, env=env, cwd=code)
    wall = round(time.perf_counter() - started, 1)
    cpu_s = round(busy_cpu_s() - cpu)
    log.write_text(done.stdout + done.stderr)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?)", done.stdout)}
    durations = [(float(s), phase, name) for s, phase, name in
                 re.findall(r"^([\d.]+)s (call|setup|teardown)\s+(\S.*?)\s*$", done.stdout, re.M)]
    seconds, tests = defaultdict(float), defaultdict(set)
    for s, _, name in durations:
        path, test = name.split("::", 1)
        seconds[path] += s
        tests[path].add(test)
    return {"wall_s": wall, "cpu_s": cpu_s, "counts": counts,
            "slowest": [(s, name) for s, phase, name in durations
                        if phase in ("call", "setup")][:SLOWEST],
            "files": sorted(((round(s, 1), len(tests[path]), path) for path, s in seconds.items()),
                            reverse=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="an earlier commit whose suite to time on the same machine")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    work = fresh_workdir("test_suite")
    count = {"now": 0, "before": 0}

    def measure(side: str, code: Path) -> dict:
        count[side] += 1
        print(f"  {side}: running its test suite (about 20 minutes on 2 cores)", flush=True)
        return timed_suite(code, work / f"{side}-{count[side]}.log")

    suites = now_and_then(measure, args.against, args.repeats)
    (work / "suites.json").write_text(json.dumps(suites))
    report(suites, args.against)


def counted(suite: dict) -> str:
    return ", ".join(f"{n} {k}" for k, n in suite["counts"].items())


def busy(suite: dict) -> str:
    """The machine's CPU over a suite's run: CPU-seconds and the share of every core."""
    return (f"{suite['cpu_s'] / (suite['wall_s'] * os.cpu_count()):.0%} busy on "
            f"{os.cpu_count()} cores ({suite['cpu_s']:,} CPU-seconds)")


def report(suites: dict, against: str | None) -> None:
    now = [s["wall_s"] for s in suites["now"]]
    last = suites["now"][-1]
    slowest = "\n".join(f"| {name} | {s:.1f} |" for s, name in last["slowest"])
    files = "\n".join(f"| {path} | {n} | {s:.1f} |"
                      for s, n, path in last["files"][:COSTLIEST_FILES])
    before = ""
    if "before" in suites:
        then = [s["wall_s"] for s in suites["before"]]
        before = (f"\nAt commit `{against[:7]}`, on the same machine in the same invocation: "
                  f"{median_spread(then)} ({counted(suites['before'][-1])}); now / then "
                  f"**{statistics.median(now) / statistics.median(then):.2f}x**.\n")
    body = f"""## The test suite (`make test` after its install)

`.venv/bin/python bench/test_suite.py{' --against ' + against[:7] if against else ''}`; {machine()}.
`pytest` of the whole suite on a real local Ray: {median_spread(now)} ({counted(last)}); the machine
{busy(last)} over the last run.
{before}
| slowest tests | s |
| --- | --- |
{slowest}

Where the time goes, by test file (pytest's set-up, call and teardown seconds of its tests; the
{COSTLIEST_FILES} costliest of {len(last['files'])} files, {sum(s for s, _, _ in last['files'][:COSTLIEST_FILES]):.0f} of {sum(s for s, _, _ in last['files']):.0f} s):

| test file | tests | s |
| --- | --- | --- |
{files}
"""
    write_section("test_suite", body)
    write_block("test_suite", f"""On this 2-core machine the suite took {statistics.median(now):.0f} s
({counted(last)}), the machine {busy(last)}
(`.venv/bin/python bench/test_suite.py` measures it and rewrites this block).{before.replace(chr(10), ' ').rstrip()} The slowest test: {last['slowest'][0][1]},
{last['slowest'][0][0]:.0f} s.""", "docs/benchmarks.md")
    print(body)


if __name__ == "__main__":
    main()
