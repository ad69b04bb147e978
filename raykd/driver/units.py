"""What one Ray Train run trains: a `Unit`, the record that planning produces and workers read.

A unit says which loop trains it (`kind`, see raykd.train.kinds), what its results rows are
called (`role`), what it depends on, and where its outputs go. Nothing on it belongs to one kind
or one method: what a kind needs (the heads to train, the neighbourhood to distil) is its
`payload`, a small typed record of that kind's own, and what a method planned for one of its
students (the heads it distils from, the parts it is stitched from) is in `method_inputs`, read
by that method alone.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

from raykd.job.specs import DataSpec, OptimSpec, ReplaySpec
from raykd.teacher.handle import TeacherHandle

# a results row's role: "teacher", "student", or what a unit kind names its own ("head", ...)
Role = str
Kind = str          # which training loop: a registered unit kind (raykd.train.kinds)
TeacherMode = Literal["first", "best", "all"]
Inputs = Literal["data", "gaussian"]


@dataclass
class HeadsPart:
    """Classifier heads to train on the frozen teacher's stages (DIH)."""
    stages: list[str]
    pooled: bool = False


@dataclass
class NeighbourhoodPart:
    """One candidate to distil for one neighbourhood (a block range) of the teacher."""
    name: str
    start: int
    stop: int
    candidate: str
    inputs: Inputs
    gaussian_samples: int
    input_shape: tuple[int, int, int]
    library: str = ""             # the neighbourhood library it is kept in ("" none)
    # block indices where any neighbourhood of the teacher's partition starts or stops: the
    # activations there are cached once per split and teacher, for all of its parts
    boundaries: tuple[int, ...] = ()
    pool: bool = False            # the teacher's blocks here downsample by max-pooling


@dataclass
class OutputsToStore:
    """Outputs of a unit's trained model that the units distilling from it read from the teacher
    cache (raykd.teacher.cache). The unit stores them as soon as it is trained, while it holds the
    model and the data: its dependants then all start on a cache hit, instead of the first of them
    loading the teacher to compute the entries while its siblings wait on the fill lock."""
    cache_dir: str
    taps: dict[str, list[str]] = field(default_factory=dict)   # split -> taps
    # its logits on replayed views, for students that replay them (raykd.teacher.replay)
    replay: ReplaySpec | None = None

    def add(self, splits, taps) -> None:
        for split in splits:
            self.taps[split] = sorted(set(self.taps.get(split, [])) | set(taps))


@dataclass
class Unit:
    key: str                      # unique in the job, e.g. "seed0-kd"; also the Ray Train run name
    role: Role
    label: str                    # the job's name for it ("kd", "kd_top5", "heads", ...)
    model: str
    optim: OptimSpec
    data: DataSpec
    seed: int
    export_path: str              # where the trained model is written
    kind: Kind = "model"
    model_args: dict[str, Any] = field(default_factory=dict)   # a torchvision:/timm: builder's
    model_stages: list[str] = field(default_factory=list)      # its stages, by module path
    weights: str | None = None    # a state_dict to start from (raykd.models.weights)
    weights_skip: list[str] = field(default_factory=list)
    method_name: str | None = None    # registered method that trains it (kind "model")
    method: dict[str, Any] = field(default_factory=dict)   # that method's parameters
    history_path: str = ""        # per-epoch metrics, one JSON object a line (appended)
    diagnostics_dir: str = ""     # per-sample diagnostics a method emits, one Parquet per epoch
    seed_stream: str = ""         # what its random seed derives from with `seed` (default: key)
    # the frozen teachers this unit may distil from, and which of them it uses
    teacher_candidates: list[str] = field(default_factory=list)
    teacher_mode: TeacherMode = "first"
    teacher_exports: list[str] = field(default_factory=list)      # resolved at launch
    teachers: list[TeacherHandle] = field(default_factory=list)   # how to reach them
    # augmented data: train on the teachers' stored views (raykd.teacher.replay), no forward
    replay: ReplaySpec | None = None
    cpus_per_worker: float = 1.0
    depends_on: list[str] = field(default_factory=list)
    # the kind's own record of what to train (HeadsPart, NeighbourhoodPart; None for "model")
    payload: Any = None
    # what the unit's method planned for it, and chose at launch (`prepare`), read by the method
    # alone: plain values (paths, keys, numbers), e.g. DIH's trained heads' exports
    method_inputs: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # a model export to start from (student.checkpoint)
    reinit: bool = False          # train the stitched / init_from architecture from fresh weights
    evaluate_test: bool = True    # False while searching (sweep trials): test is never read
    resume_dir: str | None = None      # a checkpoint folder of an earlier run to resume from
    state_dir: str = ""           # packed: the unit's own checkpoint folder ("" report to Ray Train)
    queued_at: float = 0.0        # packed: when it joined its run's queue (its wall time's start)
    store_outputs: OutputsToStore | None = None   # for its dependants, once trained
    fail_at_epoch: int | None = None   # fault injection for tests: raise after this epoch's checkpoint
    # a digest of everything that decides what the unit trains, its dependencies' included
    # (raykd.driver.plan.settle_settings): a re-run trains a unit again when it changed
    settings: str = ""

    @property
    def random_seed(self) -> int:
        """Initialisation and batch-order seed: its own stream per unit, derived from the job seed
        and the unit's key, so no two units (a teacher and a same-architecture student, a chain
        link and its teacher) start from the same weights or see the same batch order."""
        return derive_seed(self.seed, self.seed_stream or self.key)

    @property
    def augmentation_seed(self) -> int:
        """The random views of augmented training images: one stream per job seed, shared by
        every unit of that seed (raykd.train.batches.SeededSamples), so DIH heads trained
        together or one run each see the same view of an image in an epoch."""
        return derive_seed(self.seed, "augmentation")


def derive_seed(seed: int, stream: str) -> int:
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF
