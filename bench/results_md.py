"""bench/RESULTS.md is shared by every benchmark: each one rewrites only its own section."""
from __future__ import annotations

import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("# Benchmark results\n\nRatios are measured side by side in one run on the same machine; "
          "each section names the command that reproduces it.\n")


def machine() -> str:
    import os

    import ray
    import torch
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, ray {ray.__version__}, "
            f"measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, every process)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def alternating(runs: dict, repeats: int) -> dict[str, list]:
    """Run each of `runs` (name -> function returning a measurement) `repeats` times, in
    alternating order (A B, B A, A B, ...), so drift on the machine hits both sides alike."""
    names = list(runs)
    out: dict[str, list] = {name: [] for name in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            out[name].append(runs[name]())
            print(f"  {name} #{len(out[name])}: {out[name][-1]}", flush=True)
    return out


def now_and_then(measure, against: str | None, repeats: int) -> dict[str, list]:
    """`measure(side, code)` for this checkout ("now") and, with `against`, for that commit
    checked out into a temporary git worktree ("before"), alternating (see `alternating`).
    Each side's code runs with this venv (PYTHONPATH first), so both share Python, torch, Ray."""
    import subprocess
    import tempfile

    root = RESULTS.parent.parent
    runs = {"now": lambda: measure("now", root)}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        if against:
            subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(old),
                            against], check=True, capture_output=True)
            runs["before"] = lambda: measure("before", old)
        try:
            return alternating(runs, repeats)
        finally:
            if against:
                subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force",
                                str(old)], capture_output=True)


def median_spread(values, unit: str = "s", digits: int = 1) -> str:
    """`median (min-max)` of repeated measurements."""
    import statistics

    unit = f" {unit}" if unit else ""
    return (f"{statistics.median(values):.{digits}f}{unit} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def write_section(name: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def pm(values) -> str:
    """mean ± std (over seeds) of a Series of accuracies."""
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def markdown_table(frame) -> str:
    """A DataFrame as a Markdown table (floats to 4 significant digits)."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |"
              for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def write_block(name: str, body: str, path: str = "README.md") -> None:
    """Replace the `<!-- NAME -->` ... `<!-- /NAME -->` block of `path` (relative to the
    repository root: README.md or a page under docs/) with `body`. Each block has one writer,
    and that writer names the file holding it; links in `body` are relative to that file."""
    target = RESULTS.parent.parent / path
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = target.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {start} ... {end} block to rewrite")
    target.write_text(pattern.sub(lambda _: f"{start}\n{body.strip()}\n{end}", text))


def fresh_workdir(name: str) -> Path:
    """bench/runs/NAME, emptied: every benchmark starts from nothing."""
    import shutil

    work = Path(__file__).resolve().parent / "runs" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def quickstart_teacher(work: Path) -> Path:
    """The quickstart's teacher architecture (cnn_wide, 1x28x28, 10 classes), untrained, seed 0:
    its speed is what the benchmarks measure, not its accuracy."""
    import torch

    from raykd.models import build_model
    from raykd.models.export import save_export

    path = work / "teacher.pt"
    torch.manual_seed(0)
    save_export(build_model("cnn_wide", 10, 1, 28), path, 10, 1, 28)
    return path
