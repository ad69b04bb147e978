"""Files that readers may see at any moment: written aside and renamed into place, hashed, read
back without executing anything they contain, and lock files that serialise their writers."""
from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from raykd.errors import RaykdError, one_line


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a private file beside `path`, then rename it over `path`: a
    reader (or a crash) sees the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_copy(source: str | Path, target: str | Path, link: bool = False) -> Path:
    """Place a copy of `source` at `target` atomically; `link`: a hard link when both are on one
    file system (no bytes copied; safe because raykd replaces files, never rewrites them)."""
    import shutil

    def place(tmp: str) -> None:
        if link:
            os.unlink(tmp)
            try:
                os.link(source, tmp)
                return
            except OSError:
                pass
        shutil.copyfile(source, tmp)
    return atomic_write(target, place)


@contextmanager
def file_lock(path: str | Path):
    """Hold an exclusive lock on the file `path` (made, with its folder, if absent) for the
    block: one process on the machine at a time, the others wait. The OS drops the lock of a
    process that dies; the empty lock file stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def torch_save(payload, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def torch_load(path: str | Path, map_location="cpu"):
    """Load a torch file with `weights_only=True`: tensors and plain containers only, so a
    tampered file cannot run code. Anything else is a one-line error naming the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise RaykdError(f"no such file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:   # pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise RaykdError(f"{path}: not a raykd file that can be loaded safely "
                         f"({one_line(e, first=True, typed=True)})") from e


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def remove_stale_temps(path: str | Path, max_age_s: float = 3600.0) -> int:
    """Delete temporary siblings of `path` that `atomic_write` left when its process was killed
    mid-write (older than `max_age_s`, so a live writer's file is never touched)."""
    import time

    path = Path(path)
    removed = 0
    for tmp in path.parent.glob(f".{path.name}.*") if path.parent.is_dir() else []:
        try:
            if time.time() - tmp.stat().st_mtime > max_age_s:
                tmp.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def output_folder(path: str | Path, flag: str = "--out") -> Path:
    """A folder the command may write into, created; one line if it is a file or cannot be
    created or written (checked before any work)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise RaykdError(f"{flag} {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RaykdError(f"{flag} {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise RaykdError(f"{flag} {path}: not writable")
    return path


def output_file(path: str | Path, flag: str = "--out") -> Path:
    """A file the command may write (its folder created); one line if it names a folder or its
    folder cannot be created or written (checked before any work)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise RaykdError(f"{flag} {path} is a folder; give the file's path inside it")
    if path.exists() and not path.is_file():   # a device or a pipe: never replaced by a file
        raise RaykdError(f"{flag} {path} is not a regular file; give a file's path")
    output_folder(path.parent, f"{flag} {path}: its folder")
    return path
