"""What one Ray Train run trains: a `Unit` (a teacher, or one student under one method)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raykd.config import DataSpec, OptimSpec
from raykd.teacher.handle import TeacherHandle


@dataclass
class Unit:
    key: str                      # unique in the job, e.g. "seed0-kd"; also the Ray Train run name
    role: str                     # teacher | student
    label: str                    # the job's name for the method ("kd", "kd_top5", ...)
    method: dict[str, Any]        # the job's entry for that method
    model: str
    optim: OptimSpec
    data: DataSpec
    seed: int
    export_path: str              # where the trained model is written
    history_path: str = ""        # per-epoch metrics, one JSON object a line (appended)
    diagnostics_dir: str = ""     # per-sample diagnostics a method emits, one Parquet per epoch
    train_seed: int | None = None            # initialisation/order seed if not `seed` (teacher k)
    # the frozen teachers this unit may distil from, and which of them it uses:
    # first | best (highest val_top1, chosen at launch) | all
    teacher_candidates: list[str] = field(default_factory=list)
    teacher_mode: str = "first"
    teacher_exports: list[str] = field(default_factory=list)      # resolved at launch
    teachers: list[TeacherHandle] = field(default_factory=list)   # how to reach them
    cpus_per_worker: float = 1.0
    depends_on: list[str] = field(default_factory=list)
    head_stages: list[str] = field(default_factory=list)   # role head: the stages to train on
    head_pooled: bool = False
    head_exports: list[str] = field(default_factory=list)  # trained heads a student's method uses
    # role neighbourhood: {name, start, stop, candidate, inputs, gaussian_samples, input_shape}
    neighbourhood: dict | None = None
    neighbourhood_units: list[str] = field(default_factory=list)  # a stitched student's parts
    stitch: dict | None = None    # {teacher, parts: [[start, stop, candidate export]]}, at launch
    reinit: bool = False          # train the stitched architecture from a fresh initialisation
    fail_at_epoch: int | None = None   # fault injection for tests: raise after this epoch's checkpoint
