"""Frozen teachers. Every distillation loop gets teacher outputs only through a `Teacher`:
`teacher.features(x, taps) -> {tap: tensor}`.
"""
from raykd.teacher.local import LocalTeacher, Teacher, freeze

__all__ = ["LocalTeacher", "Teacher", "freeze"]
