"""Frozen teachers and how training runs reach them.

- `LocalTeacher`: the model in the training worker's own process.
- `TeacherService` / `TeacherClient`: shard actors chained into a pipeline, with replicas.
- `CachedTeacher`: stored outputs for deterministic inputs (raykd.teacher.cache).
All share one interface: `submit(x, taps, index).result()` and `features(x, taps, index)`;
raykd.teacher.access opens the right one from a `TeacherHandle`.
"""
from raykd.teacher.handle import TeacherHandle
from raykd.teacher.local import LocalTeacher, Teacher, freeze

__all__ = ["LocalTeacher", "Teacher", "TeacherHandle", "freeze"]
