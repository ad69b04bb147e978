"""raykd's logging: one logger ("raykd"), one format for progress lines, in the driver and in
every Ray worker. `print` is kept for the tables the CLI prints."""
from __future__ import annotations

import logging
import os
import sys

LOGGER = "raykd"
FORMAT = "raykd: %(message)s"
log = logging.getLogger(LOGGER)


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Send raykd's records to stderr as `raykd: MESSAGE`, once per process."""
    if not any(getattr(h, "_raykd", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._raykd = True
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    return log


def quiet_ray_logs() -> None:
    """Ray Train logs every checkpoint and report at INFO; our own epoch line says enough.
    Some of Ray's modules name their logger by file path rather than by module, so every logger
    under Ray's package folder is quietened too (found by name, not by importing private code)."""
    import ray

    ray_dir = os.path.dirname(ray.__file__)
    names = ["ray.train", "ray.tune", "ray.data"] + [
        name for name in list(logging.Logger.manager.loggerDict)
        if name.startswith(os.path.join(ray_dir, "train")) or
        name.startswith(os.path.join(ray_dir, "tune"))]
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


def duration(seconds: float) -> str:
    """4s, 1m05s, 2h03m: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
