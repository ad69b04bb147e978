"""The names of a unit's files in a run's checkpoint or in its own folder.

Shared by the workers that write them (raykd.train.progress, raykd.train.kinds) and the task that
launches runs and reads them back (raykd.train.runner). Kept free of torch so that launching task
starts without importing it.
"""
from __future__ import annotations

FAILED = "failed.txt"   # in a packed unit's state_dir: why its last attempt failed


def state_file(key: str) -> str:
    """A unit's trainable state (a pack's workers' files are merged into one checkpoint)."""
    return f"state-{key}.pt"


def metrics_file(key: str) -> str:
    """A unit's metrics at its last checkpointed epoch."""
    return f"metrics-{key}.json"
