"""Frozen teachers and how training runs reach them.

- `LocalTeacher`: the model in the training worker's own process.
- `TeacherService` / `TeacherClient`: shard actors chained into a pipeline, with replicas.
- `CachedTeacher`: stored outputs for deterministic inputs (raykd.teacher.cache).
All share one interface: `submit(x, taps, index).result()` and `features(x, taps, index)`;
raykd.teacher.access opens the right one from a `TeacherHandle`.
"""
from raykd.teacher.handle import TeacherHandle

__all__ = ["LocalTeacher", "Teacher", "TeacherHandle", "freeze"]


def __getattr__(name: str):
    # Imported on first use: a process that only passes units around (a pack's queue actor, the
    # scheduler) unpickles `TeacherHandle`s and must not pay torch's 2 s import for them.
    if name in ("LocalTeacher", "Teacher", "freeze"):
        from raykd.teacher import local
        return getattr(local, name)
    raise AttributeError(f"module 'raykd.teacher' has no attribute {name!r}")
