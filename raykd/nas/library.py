"""The neighbourhood library: distilled neighbourhoods kept for reuse (architecture search).

A folder with `catalog.parquet` (one row per distilled (teacher, position, candidate, recipe))
and `parts/` (the candidates' checkpoints). Neighbourhood Distillation runs append to it as each
part finishes (`methods.LABEL.library`, default OUTPUT_DIR/neighbourhoods); a part already in
the library is taken from it instead of being trained again. Several jobs and teachers may share
one library: rows are keyed by the teacher's weights hash, and appends are serialised by a lock
file, so two jobs finishing parts at once both land. The catalog is replaced atomically and a
checkpoint's file never changes once written, so a reader (`raykd search`) needs no lock.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import pandas as pd

from raykd.errors import RaykdError
from raykd.files import atomic_copy, atomic_write, file_hash, file_lock

CATALOG = "catalog.parquet"
KEY = ["teacher_hash", "nb_start", "nb_stop", "candidate", "recipe"]


def recipe_digest(unit) -> str:
    """How a part was distilled (besides teacher, position and candidate): training settings,
    inputs, data, seed and how the candidate downsamples. A part with another recipe is another
    library entry."""
    nb = unit.payload
    blob = json.dumps({"optim": dataclasses.asdict(unit.optim), "inputs": nb.inputs,
                       "pool": nb.pool,
                       "gaussian_samples": nb.gaussian_samples,
                       "data": dataclasses.asdict(unit.data), "seed": unit.random_seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def same_key(df: pd.DataFrame, key: dict) -> pd.Series:
    """Which rows of catalog `df` are the entry `key` names (its KEY columns)."""
    match = pd.Series(True, index=df.index)
    for column in KEY:
        match &= df[column] == key[column]
    return match


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

    def find(self, teacher_hash: str, start: int, stop: int, candidate: str,
             recipe: str) -> dict | None:
        """The intact entry for this part, or None (an entry whose checkpoint is missing or
        altered does not count: the part is trained again and the entry replaced)."""
        df = self.read()
        if not len(df):
            return None
        hit = df[same_key(df, {"teacher_hash": teacher_hash, "nb_start": start, "nb_stop": stop,
                               "candidate": candidate, "recipe": recipe})]
        for row in hit.to_dict("records"):
            path = Path(row["checkpoint"])
            if path.is_file() and file_hash(path) == row["checkpoint_hash"]:
                return row
        return None

    def add(self, row: dict, export_path: str) -> dict:
        """Copy a finished part's checkpoint in and append its row (replacing an entry with the
        same key). A checkpoint's file is named by its content's hash and never rewritten, so a
        search reading the library while a job adds to it verifies and loads the same bytes."""
        digest = file_hash(export_path)
        name = f"{row['neighbourhood']}-{row['candidate']}-{row['recipe']}-{digest[:12]}.pt"
        target = self.root / "parts" / row["teacher_hash"] / name
        if not (target.is_file() and file_hash(target) == digest):
            atomic_copy(export_path, target)
        entry = {**row, "checkpoint": str(target), "checkpoint_hash": digest,
                 "added": time.strftime("%Y-%m-%d %H:%M:%S")}
        with file_lock(self.root / ".lock"):
            df = self.read()
            if len(df):
                df = df[~same_key(df, entry)]
            df = pd.concat([df, pd.DataFrame([entry])], ignore_index=True) if len(df) \
                else pd.DataFrame([entry])
            atomic_write(self.catalog_path, lambda tmp: df.to_parquet(tmp, index=False))
        return entry
