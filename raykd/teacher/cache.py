"""Teacher-output cache: computed once for deterministic inputs, stored as Parquet, reused.

An entry holds the requested taps for every sample of one split, in the split's order, keyed by
the teacher export's hash, the dataset and its split parameters, the split name and the taps. A
changed key (new teacher weights, another split) is another entry, so stale data is never served.
Writers build an entry in a private folder and rename it into place: concurrent writers cannot
corrupt one, and the first to finish wins. The manifest records each file's hash: an entry
damaged afterwards (truncated, altered) is detected on load, discarded with a warning and
computed again. Private folders left by a killed writer are removed once they are an hour old.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from raykd.files import file_hash
from raykd.log import log
from raykd.teacher.local import Done

ROWS_PER_FILE = 8192
MANIFEST = "manifest.json"
STALE_S = 3600.0     # a writer's private folder older than this was left by a killed writer


def cache_key(teacher_export: str, data_spec, split: str, taps: list[str]) -> str:
    data = dataclasses.asdict(data_spec)
    for k in ("batch_size", "eval_batch_size", "loader_workers"):   # don't change the data
        data.pop(k, None)
    blob = json.dumps({"teacher": file_hash(teacher_export), "data": data, "split": split,
                       "taps": sorted(taps)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class FeatureCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors; None if absent, or if damaged (then it is discarded)."""
        entry = self.path(key)
        if not entry.exists():
            return None
        try:
            return self._read(entry)
        except Exception as e:   # truncated, altered, half-deleted: never serve it
            log.warning("teacher cache entry %s is damaged (%s); discarding it and computing "
                        "it again", entry, str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.discard(key)
            return None

    def discard(self, key: str) -> None:
        aside = self.root / f".tmp-discard-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path(key), aside)   # atomically out of readers' way
        except OSError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    def remove_stale(self, max_age_s: float = STALE_S) -> int:
        """Remove private folders of writers killed mid-write; return how many."""
        import time

        removed = 0
        for tmp in self.root.glob(".tmp-*") if self.root.is_dir() else []:
            try:
                if time.time() - tmp.stat().st_mtime > max_age_s:
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
            except OSError:
                continue
        return removed

    @staticmethod
    def _read(entry: Path) -> dict[str, torch.Tensor]:
        meta = json.loads((entry / MANIFEST).read_text())
        for name, digest in meta.get("hashes", {}).items():
            if file_hash(entry / name) != digest:
                raise ValueError(f"{name} does not match its recorded hash")
        table = pa.concat_tables([pq.read_table(entry / name) for name in meta["files"]])
        if len(table) != meta["rows"]:
            raise ValueError(f"{len(table)} rows, the manifest says {meta['rows']}")
        out = {}
        for tap, shape in meta["taps"].items():
            col = table.column(tap).combine_chunks()
            values = col.values.to_numpy(zero_copy_only=False)
            out[tap] = torch.from_numpy(values.reshape(len(table), *shape).copy())
        return out

    def store(self, key: str, tensors: dict[str, torch.Tensor]) -> bool:
        """Write an entry; return False if another writer stored it first."""
        if self.path(key).exists():
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            n = len(next(iter(tensors.values())))
            files = []
            for i, lo in enumerate(range(0, n, ROWS_PER_FILE)):
                cols = {}
                for tap, t in tensors.items():
                    flat = t[lo:lo + ROWS_PER_FILE].reshape(min(ROWS_PER_FILE, n - lo), -1)
                    arr = np.ascontiguousarray(flat.numpy(), dtype=np.float32)
                    cols[tap] = pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), arr.shape[1])
                name = f"part-{i:05d}.parquet"
                pq.write_table(pa.table(cols), tmp / name)
                files.append(name)
            meta = {"rows": n, "files": files,
                    "hashes": {name: file_hash(tmp / name) for name in files},
                    "taps": {tap: list(t.shape[1:]) for tap, t in tensors.items()}}
            (tmp / MANIFEST).write_text(json.dumps(meta))
            try:
                os.rename(tmp, self.path(key))
            except OSError:   # someone else renamed theirs in first
                return False
            return True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


class CachedTeacher:
    """The `Teacher` interface over stored outputs, looked up by sample index."""

    def __init__(self, source, stored: dict[str, torch.Tensor], device):
        self.source = source      # the teacher these outputs are (or were) computed by
        self.model = source.model
        self.stored = stored
        self.device = torch.device(device)

    def checksum(self) -> str:
        return self.source.checksum()

    def features(self, x, taps, index=None) -> dict[str, torch.Tensor]:
        if index is None:
            raise ValueError("a cached teacher needs the batch's sample indices")
        return {t: self.stored[t][index].to(self.device) for t in taps}

    def submit(self, x, taps, index=None) -> Done:
        return Done(self.features(x, taps, index))


def cached_teacher(teacher, cache_dir: str, export_path: str, data_spec, split: str, dataset,
                   taps: list[str], batch_size: int, log=log.info) -> CachedTeacher:
    """Load the entry for (teacher, data, split, taps), computing and storing it if absent."""
    cache = FeatureCache(cache_dir)
    cache.remove_stale()
    key = cache_key(export_path, data_spec, split, taps)
    stored = cache.load(key)
    if stored is None:
        log(f"teacher cache miss ({split}, {', '.join(taps)}): computing {key}")
        chunks: dict[str, list[torch.Tensor]] = {t: [] for t in taps}
        for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            for t, v in teacher.features(x, taps).items():
                chunks[t].append(v.detach().float().cpu())
        stored = {t: torch.cat(v) for t, v in chunks.items()}
        cache.store(key, stored)
    else:
        log(f"teacher cache hit ({split}, {', '.join(taps)}): {key}")
    return CachedTeacher(teacher, stored, getattr(teacher, "device", "cpu"))
