"""How a training run reaches its teachers: a `TeacherHandle` becomes the `Teacher` interface
in the worker (the model in-process, or a client of the job's shard actors); for
deterministic inputs the teacher's stored outputs (computed once, raykd.teacher.cache), and for
augmented inputs under `teacher.replay` its stored views (raykd.teacher.replay)."""
from __future__ import annotations

import os
import time

from raykd.data import load_dataset
from raykd.log import log
from raykd.teacher.cache import cached_teacher
from raykd.teacher.handle import TeacherHandle
from raykd.teacher.local import LocalTeacher
from raykd.teacher.replay import ReplayedViews, TeacherLogits, replayed_teacher
from raykd.teacher.service import TeacherClient


def open_teacher(handle: TeacherHandle, device):
    if handle.placement == "actors":
        return TeacherClient(handle, device)
    return LocalTeacher(handle.export_path, device)


def open_teachers(handles: list[TeacherHandle], taps: list[str], data_spec, splits, device,
                  name: str = "", read: list[str] | None = None) -> list:
    """The unit's teachers; for deterministic inputs, their stored outputs on the training split
    (computed on first use by whichever run needs them first), of which it reads `read`."""
    teachers = [open_teacher(h, device) for h in handles]
    if not (taps and splits.deterministic):
        return teachers
    return [cached_teacher(t, h.cache_dir, h.export_path, data_spec, "train", splits.train, taps,
                           data_spec.eval_batch_size,
                           log=lambda m: log.info("[%s] %s", name, m), read=read)
            if h.cache_dir else t for t, h in zip(teachers, handles)]


def open_replayed(unit, method, architectures: list, views: ReplayedViews, num_classes: int,
                  device) -> list:
    """The unit's teachers as their stored views for its method (filled on first use)."""
    inputs = method_input_files(unit.method_inputs)
    return [replayed_teacher(h, model, lambda h=h: open_teacher(h, device), method, unit.data,
                             views, num_classes, inputs, device,
                             say=lambda m: log.info("[%s] %s", unit.key, m), filled_by=unit.key)
            for h, model in zip(unit.teachers, architectures)]


def method_input_files(inputs: dict) -> list[str]:
    """The files among a unit's method inputs (a DIH student's heads): what its method computes
    the teacher's scores with, beside the teacher."""
    values = [v for value in inputs.values()
              for v in (value if isinstance(value, (list, tuple)) else [value])]
    return sorted(v for v in values if isinstance(v, str) and os.path.isfile(v))


def store_outputs(unit, device) -> None:
    """Store, from the export just written, the outputs that the units distilling from this one
    read from the teacher cache (`unit.store_outputs`), so that they all start on a hit."""
    request = unit.store_outputs
    splits = load_dataset(unit.data) if request else None
    if request and request.replay and not splits.deterministic:
        store_replay(unit, splits, device)
    if not (request and request.taps and splits.deterministic):
        return
    started, teacher = time.perf_counter(), LocalTeacher(unit.export_path, device)
    for split, taps in request.taps.items():
        cached_teacher(teacher, request.cache_dir, unit.export_path, unit.data, split,
                       getattr(splits, split), taps, unit.data.eval_batch_size, log=lambda m: None)
    log.info("[%s] stored its outputs for the units that distil from it (%s: %s) in %.1fs",
             unit.key, ", ".join(request.taps), ", ".join(sorted(
                 {t for taps in request.taps.values() for t in taps})),
             time.perf_counter() - started)


def store_replay(unit, splits, device) -> None:
    """Fill, from the export just written, the replay entry of this teacher's logits that its
    replaying students read (their seed only picks which stored view an epoch trains on)."""
    request, teacher = unit.store_outputs, LocalTeacher(unit.export_path, device)
    views = ReplayedViews(splits.train, request.replay, student_seed=0)
    replayed_teacher(TeacherHandle(unit.export_path, cache_dir=request.cache_dir), teacher.model,
                     lambda: teacher, TeacherLogits(), unit.data, views, splits.num_classes, [],
                     device, say=lambda m: log.info("[%s] %s", unit.key, m), filled_by=unit.key)
