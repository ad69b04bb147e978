"""Teacher-output cache: computed once for deterministic inputs, stored as Parquet, reused.

An entry holds the requested taps for every sample of one split, in the split's order, keyed by
the teacher export's hash, the dataset and its split parameters, the split name and the taps. A
changed key (new teacher weights, another split) is another entry, so stale data is never served.
Writers build an entry in a private folder and rename it into place: concurrent writers cannot
corrupt one, and the first to finish wins.
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
        entry = self.path(key)
        manifest = entry / MANIFEST
        if not manifest.is_file():
            return None
        meta = json.loads(manifest.read_text())
        parts = [pq.read_table(entry / name) for name in meta["files"]]
        table = pa.concat_tables(parts)
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
