"""Faults injected into the files raykd writes: a process killed at random moments while it
rewrites the results table and a model export, again and again."""
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd

from raykd.files import remove_stale_temps, torch_load
from raykd.outputs.results import read_results

WRITER = r"""
import sys, torch
from raykd.files import torch_save
from raykd.outputs.results import ResultsTable
run_dir, export = sys.argv[1], sys.argv[2]
table = ResultsTable(run_dir)
i = len(table.rows)
while True:
    i += 1
    table.add([{"unit": f"u{i}", "method": "kd", "role": "student", "model": "m",
                "dataset": "d", "seed": 0, "val_top1": 0.5, "test_top1": 0.5, "params": i,
                "wall_s": 1.0, "epochs": 1, "blob": "x" * (1000 * (i % 50))}])
    torch_save({"kind": "model", "step": i, "w": torch.randn(20000 + 997 * (i % 40))}, export)
    print(i, flush=True)
"""


def test_a_writer_killed_at_random_moments_never_leaves_a_torn_file(tmp_path):
    run_dir, export = tmp_path / "run", tmp_path / "model.pt"
    run_dir.mkdir()
    rng = random.Random(0)
    last_rows = 0
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), str(export)],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()            # at least one write done by this process
        time.sleep(rng.uniform(0.0, 0.4))  # then die somewhere in the middle of a write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rows = read_results(run_dir)       # the old table or the new one, never a torn one
        assert len(rows) > last_rows and rows.unit.is_unique
        last_rows = len(rows)
        payload = torch_load(export)       # the same for the export
        assert payload["kind"] == "model" and len(payload["w"]) >= 20000
    # what the killed writers left beside the files is theirs to clean once it is stale
    leftovers = [p for p in tmp_path.rglob(".*") if p.is_file()]
    for p in leftovers:
        os.utime(p, (time.time() - 4000, time.time() - 4000))
    removed = remove_stale_temps(run_dir / "results.parquet") + remove_stale_temps(export)
    assert removed == len(leftovers)
    assert isinstance(pd.read_parquet(run_dir / "results.parquet"), pd.DataFrame)
