"""The command line: --help everywhere, one-line errors (no traceback) on bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

RAYKD = str(Path(sys.executable).parent / "raykd")


def _run(*args, cwd=None):
    return subprocess.run([RAYKD, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["sweep", "--help"],
                                  ["results", "--help"], ["export", "--help"],
                                  ["report", "--help"]])
def test_help(args):
    res = _run(*args)
    assert res.returncode == 0 and "usage: raykd" in res.stdout


@pytest.mark.parametrize("args,message", [
    (["run", "absent.yaml"], "job file not found: absent.yaml"),
    (["run", "JOB", "student.nope=1"], "unknown key student.nope"),
    (["run", "JOB", "data.dataset=cifar100", "data.root=/nowhere"],
     "dataset cifar100 not found at /nowhere/cifar-100-python"),
    (["results", "/nowhere"], "no results table at /nowhere/results.parquet"),
    (["export", "/nowhere", "--label", "kd"], "no results table at /nowhere/results.parquet"),
    (["report", "/nowhere"], "no results table at /nowhere/results.parquet"),
])
def test_bad_input_is_one_line_and_non_zero(tmp_path, args, message):
    job = tmp_path / "job.yaml"
    job.write_text(f"output_dir: {tmp_path}\nseeds: [0]\n")
    res = _run(*[str(job) if a == "JOB" else a for a in args])
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("raykd: error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr
