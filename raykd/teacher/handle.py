"""`TeacherHandle`: what a training run is told about its teacher (small and picklable).

raykd.teacher.access turns it into something with the `Teacher` interface inside the worker.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TeacherHandle:
    export_path: str
    placement: str = "local"                 # local | actors
    service: str | None = None               # actor name prefix, for placement=actors
    replicas: int = 1
    ranges: list[tuple[int, int]] = field(default_factory=list)   # block range per shard
    tap_blocks: dict[str, int] = field(default_factory=dict)      # tap name -> block index
    timeout_s: float = 120.0
    cache_dir: str | None = None             # None: no feature cache
