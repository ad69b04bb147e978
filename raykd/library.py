"""The neighbourhood library: distilled neighbourhoods kept for reuse (architecture search).

A folder with `catalog.parquet` (one row per distilled (teacher, position, candidate, recipe))
and `parts/` (the candidates' checkpoints). Neighbourhood Distillation runs append to it as each
part finishes (`methods.LABEL.library`, default OUTPUT_DIR/neighbourhoods); a part already in
the library is taken from it instead of being trained again. Several jobs and teachers may share
one library: rows are keyed by the teacher's weights hash, and appends are serialised by a lock
file, so two jobs finishing parts at once both land.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from raykd.errors import RaykdError
from raykd.files import atomic_copy, atomic_write, file_hash

CATALOG = "catalog.parquet"
KEY = ["teacher_hash", "nb_start", "nb_stop", "candidate", "recipe"]


def recipe_digest(unit) -> str:
    """How a part was distilled (besides teacher, position and candidate): training settings,
    inputs, data, seed and how the candidate downsamples. A part with another recipe is another
    library entry."""
    nb = unit.neighbourhood
    blob = json.dumps({"optim": dataclasses.asdict(unit.optim), "inputs": nb.inputs,
                       "pool": nb.pool,
                       "gaussian_samples": nb.gaussian_samples,
                       "data": dataclasses.asdict(unit.data), "seed": unit.random_seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class NeighbourhoodLibrary:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.catalog_path = self.root / CATALOG

    def read(self) -> pd.DataFrame:
        if not self.catalog_path.is_file():
            return pd.DataFrame(columns=KEY)
        try:
            return pd.read_parquet(self.catalog_path)
        except Exception as e:
            raise RaykdError(f"{self.catalog_path}: not a readable catalog "
                             f"({type(e).__name__})") from e

    @contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def find(self, teacher_hash: str, start: int, stop: int, candidate: str,
             recipe: str) -> dict | None:
        """The intact entry for this part, or None (an entry whose checkpoint is missing or
        altered does not count: the part is trained again and the entry replaced)."""
        df = self.read()
        if not len(df):
            return None
        hit = df[(df.teacher_hash == teacher_hash) & (df.nb_start == start) &
                 (df.nb_stop == stop) & (df.candidate == candidate) & (df.recipe == recipe)]
        for row in hit.to_dict("records"):
            path = Path(row["checkpoint"])
            if path.is_file() and file_hash(path) == row["checkpoint_hash"]:
                return row
        return None

    def add(self, row: dict, export_path: str) -> dict:
        """Copy a finished part's checkpoint in and append its row (replacing an entry with the
        same key)."""
        name = f"{row['neighbourhood']}-{row['candidate']}-{row['recipe']}.pt"
        target = self.root / "parts" / row["teacher_hash"] / name
        atomic_copy(export_path, target)
        entry = {**row, "checkpoint": str(target), "checkpoint_hash": file_hash(target),
                 "added": time.strftime("%Y-%m-%d %H:%M:%S")}
        with self._locked():
            df = self.read()
            if len(df):
                same = ((df.teacher_hash == entry["teacher_hash"]) &
                        (df.nb_start == entry["nb_start"]) & (df.nb_stop == entry["nb_stop"]) &
                        (df.candidate == entry["candidate"]) & (df.recipe == entry["recipe"]))
                df = df[~same]
            df = pd.concat([df, pd.DataFrame([entry])], ignore_index=True) if len(df) \
                else pd.DataFrame([entry])
            atomic_write(self.catalog_path, lambda tmp: df.to_parquet(tmp, index=False))
        return entry
