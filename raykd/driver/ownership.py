"""One driver per run folder: `raykd run` and `raykd sweep` own RUN_DIR while they work.

Two drivers on one folder would both train its unfinished units and each "resume" from the
other's in-flight checkpoints. The owner holds an exclusive `flock` on RUN_DIR/.raykd-owner for
as long as it lives (the OS drops it when the process dies, however it dies, so an owner is never
stale) and writes its pid, host and start time into the file for the one line a second driver
prints. Within one process ownership nests (a sweep runs jobs in its own folder).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from raykd.errors import RaykdError

OWNER_FILE = ".raykd-owner"
_HELD: dict[str, object] = {}    # folder -> the open file holding its lock, in this process


def own(run_dir: str | Path, wait: bool = False) -> None:
    """Take RUN_DIR for this process until it exits; a folder another live driver owns is a
    one-line error naming it (or, with `wait`, waited for)."""
    folder = str(Path(run_dir).resolve())
    if folder in _HELD:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    f = open(Path(folder) / OWNER_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        f.seek(0)
        try:
            owner = json.loads(f.read() or "{}")
        except ValueError:
            owner = {}
        f.close()
        since = time.strftime("%H:%M:%S", time.localtime(owner.get("since", 0)))
        raise RaykdError(
            f"{folder} is in use by another raykd driver (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, since {since}); wait for it to end, stop it, or give "
            "this job another name (name=...)") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
    f.flush()
    _HELD[folder] = f      # kept open: the lock lasts as long as this process
