"""Teacher-output cache: computed once for deterministic inputs, stored as arrays, memory-mapped.

An entry holds the requested taps for every sample of one split, in the split's order, keyed by
the teacher export's hash, the dataset and its split parameters, the split name and the taps. Each
tap is one `.npy` array (samples first; two names of one activation share it) that readers
memory-map: the workers of a node share its
pages through the OS page cache, a batch reads only its own rows, and an entry larger than memory
still works. A changed key (new teacher weights, another split) is another entry, so stale data is
never served. Writers fill an entry in a private folder, streaming batch by batch, and rename it
into place: concurrent writers cannot corrupt one, and the first to finish wins. Processes on
one machine that miss the same entry at once compute it once: the others wait on its lock. The
manifest records each file's size and hash: an entry damaged afterwards (truncated, altered) is
detected on load (hashed once per process and file), discarded with a warning and computed again.
Private folders left by a killed writer are removed once they are an hour old.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from raykd.data import data_identity
from raykd.errors import one_line
from raykd.files import file_hash, file_lock
from raykd.log import log
from raykd.teacher.local import Done

MANIFEST = "manifest.json"
STALE_S = 3600.0     # a writer's private folder older than this was left by a killed writer
_verified: set[tuple[str, int, int]] = set()   # (file, size, mtime) hashed by this process


def source_key(teacher_export: str, data_spec, split: str) -> str:
    """What an entry's rows are computed from (teacher weights, data, split), whatever its taps."""
    data = data_identity(data_spec)
    for k in ("batch_size", "eval_batch_size", "loader_workers"):   # don't change the data
        data.pop(k, None)
    blob = json.dumps({"teacher": file_hash(teacher_export), "data": data, "split": split},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_key(teacher_export: str, data_spec, split: str, taps: list[str]) -> str:
    blob = json.dumps({"source": source_key(teacher_export, data_spec, split),
                       "taps": sorted(taps)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def stored_dtype(t: torch.Tensor) -> np.dtype:
    """How a tap is stored: activations as float32 (whatever precision computed them); float16
    and integer arrays (replayed views' log-probabilities and class indices) as they are."""
    if t.dtype == torch.float16 or not t.is_floating_point():
        return torch.empty(0, dtype=t.dtype).numpy().dtype
    return np.dtype(np.float32)


class EntryWriter:
    """Fills one entry batch by batch in a private folder; `commit` renames it into place."""

    def __init__(self, cache: "FeatureCache", key: str, rows: int, source: str = "",
                 filled_by: str = ""):
        self.cache, self.key, self.rows, self.source = cache, key, rows, source
        self.filled_by = filled_by    # the unit that computed it (for the curious; not read)
        cache.root.mkdir(parents=True, exist_ok=True)
        self.tmp = cache.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.arrays: dict[str, np.ndarray] = {}
        self.files: dict[str, str] = {}
        self.aliases: set[str] = set()   # taps stored in another tap's file

    def write(self, lo: int, tensors: dict[str, torch.Tensor]) -> None:
        first_of: dict[int, str] = {}   # id of a tensor in this batch -> the tap it came first as
        for tap, t in tensors.items():
            if tap in self.aliases:
                continue
            if tap not in self.files and id(t) in first_of:
                # two names of one activation (a stage and its block, asked for by DIH heads
                # and neighbourhood parts of one teacher): one file, listed under both
                self.files[tap] = self.files[first_of[id(t)]]
                self.aliases.add(tap)
                continue
            first_of[id(t)] = tap
            if tap not in self.arrays:   # the first batch tells each tap's per-sample shape
                name = f"tap-{len(self.files)}.npy"
                self.files[tap] = name
                self.arrays[tap] = np.lib.format.open_memmap(
                    self.tmp / name, mode="w+", dtype=stored_dtype(t),
                    shape=(self.rows, *t.shape[1:]))
            kept = t if t.dtype == torch.float16 or not t.is_floating_point() else t.float()
            self.arrays[tap][lo:lo + len(t)] = kept.detach().cpu().numpy()

    def commit(self) -> bool:
        """Put the entry in place; False if another writer stored it first."""
        try:
            for array in self.arrays.values():
                array.flush()
            self.arrays.clear()
            meta = {"rows": self.rows, "source": self.source, "filled_by": self.filled_by,
                    "taps": {tap: name for tap, name in self.files.items()},
                    "sizes": {name: (self.tmp / name).stat().st_size for name in self.files.values()},
                    "hashes": {name: file_hash(self.tmp / name) for name in self.files.values()}}
            (self.tmp / MANIFEST).write_text(json.dumps(meta))
            try:
                os.rename(self.tmp, self.cache.path(self.key))
            except OSError:   # someone else renamed theirs in first
                return False
            for name in self.files.values():   # hashed just now, by this process: verified
                path = self.cache.path(self.key) / name
                stat = path.stat()
                _verified.add((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
            return True
        finally:
            self.abandon()

    def abandon(self) -> None:
        self.arrays.clear()
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


class FeatureCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str, taps: list[str] | None = None) -> dict[str, torch.Tensor] | None:
        """The entry's tensors (only `taps`, when given), memory-mapped (copy-on-write: a write
        stays private to the process); None if absent, or if damaged (then it is discarded)."""
        entry = self.path(key)
        if not entry.exists():
            return None
        try:
            return self._read(entry, taps)
        except Exception as e:   # truncated, altered, half-deleted: never serve it
            log.warning("teacher cache entry %s is damaged (%s); discarding it and computing "
                        "it again", entry, one_line(e, first=True))
            self.discard(key)
            return None

    @contextmanager
    def filling(self, key: str):
        """Hold the entry's fill lock: of the processes on one machine that miss the same entry
        at once (parts of one teacher starting together), one computes it and the others wait
        and read it. The OS drops the lock of a process that dies; the empty lock file stays."""
        with file_lock(self.root / f".lock-{key}"):
            yield

    def holding(self, source: str, taps: list[str]) -> str | None:
        """The key of an entry computed from the same teacher, data and split that holds at
        least `taps` (e.g. logits from an entry that also holds stage maps), or None."""
        for manifest in sorted(self.root.glob("*/" + MANIFEST)) if self.root.is_dir() else []:
            try:
                meta = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("source") == source and set(taps) <= set(meta.get("taps", {})):
                return manifest.parent.name
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
    def _read(entry: Path, taps: list[str] | None = None) -> dict[str, torch.Tensor]:
        meta = json.loads((entry / MANIFEST).read_text())
        wanted = meta["taps"] if taps is None else {t: meta["taps"][t] for t in taps}
        for name in wanted.values():
            digest = meta["hashes"][name]
            stat = (entry / name).stat()
            if stat.st_size != meta["sizes"][name]:
                raise ValueError(f"{name} is {stat.st_size} bytes, the manifest says "
                                 f"{meta['sizes'][name]}")
            seen = (str((entry / name).resolve()), stat.st_size, stat.st_mtime_ns)
            if seen not in _verified:    # a same-size alteration: only the hash can tell
                if file_hash(entry / name) != digest:
                    raise ValueError(f"{name} does not match its recorded hash")
                _verified.add(seen)
        out = {}
        for tap, name in wanted.items():
            array = np.load(entry / name, mmap_mode="c")
            if len(array) != meta["rows"]:
                raise ValueError(f"{name} has {len(array)} rows, the manifest says {meta['rows']}")
            out[tap] = torch.from_numpy(array)
        return out

    def store(self, key: str, tensors: dict[str, torch.Tensor]) -> bool:
        """Write an entry from whole tensors; return False if another writer stored it first."""
        if self.path(key).exists():
            return False
        writer = EntryWriter(self, key, len(next(iter(tensors.values()))))
        try:
            writer.write(0, tensors)
        except BaseException:
            writer.abandon()
            raise
        return writer.commit()


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
                   taps: list[str], batch_size: int, log=log.info,
                   read: list[str] | None = None) -> CachedTeacher:
    """Load the entry for (teacher, data, split, taps), computing and storing it if absent.
    `read`: the taps this reader uses, when fewer than the entry's (a neighbourhood part reads
    its own two ends of an entry holding every boundary): only those are mapped and verified, so
    a part deep in the network never hashes the wide early activations it does not read."""
    cache = FeatureCache(cache_dir)
    cache.remove_stale()
    source = source_key(export_path, data_spec, split)
    key = cache_key(export_path, data_spec, split, taps)
    read = read or taps

    def lookup() -> tuple[dict | None, str]:
        stored = cache.load(key, read)
        if stored is None and (holder := cache.holding(source, taps)) is not None:
            return cache.load(holder, read), holder    # a wider entry serves these taps
        return stored, key

    stored, found = lookup()
    if stored is None:
        with cache.filling(key):
            stored, found = lookup()      # filled by another process while this one waited
            if stored is None:
                log(f"teacher cache miss ({split}, {', '.join(taps)}): computing {key}")
                stored, found = fill_entry(cache, key, source, teacher, dataset, taps,
                                           batch_size, read), None
    if found:
        log(f"teacher cache hit ({split}, {', '.join(taps)}): {found}")
    return CachedTeacher(teacher, stored, getattr(teacher, "device", "cpu"))


def fill_entry(cache: FeatureCache, key: str, source: str, teacher, dataset, taps: list[str],
               batch_size: int, read: list[str]) -> dict:
    """Compute the entry from the teacher, batch by batch in dataset order, and read back the
    taps in `read`."""
    writer, lo = EntryWriter(cache, key, len(dataset), source), 0
    try:
        for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            writer.write(lo, teacher.features(x, taps))
            lo += len(x)
    except BaseException:
        writer.abandon()
        raise
    writer.commit()
    stored = cache.load(key, read)
    if stored is None:
        raise RuntimeError(f"teacher cache entry {key} could not be read back after writing")
    return stored
