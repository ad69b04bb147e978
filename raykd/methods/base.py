"""The method contract (after mdistiller): one small class per method.

A method declares which activations it needs from the student and from the teacher (by tap name),
may own extra trainable modules (connectors, transformations) that train with the student and are
dropped at export, and turns one step's activations into a dict of named, *weighted* losses.
The training loop sums and logs that dict and never looks at which method produced it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from raykd.errors import RaykdError
from raykd.job.typed import from_dict
from raykd.models import LOGITS, StagedModel


@dataclass
class MethodContext:
    """What a method may know when it is built."""
    student: StagedModel
    num_classes: int
    input_shape: tuple[int, int, int]
    teacher: StagedModel | None = None   # architecture only (shapes); its outputs come as tensors
    teachers: list | None = None         # every teacher's architecture, when the method uses all
    inputs: dict = field(default_factory=dict)   # the unit's `method_inputs` (its plan's)
    shapes_only: bool = False            # built by the start-up check, never trained
    train_size: int = 0                  # training images (index range of Step.index)


@dataclass
class Step:
    """One training step's inputs and activations, as a method sees them."""
    x: torch.Tensor
    y: torch.Tensor
    student: dict[str, torch.Tensor]      # requested student taps (always includes logits)
    teacher: dict[str, torch.Tensor]      # requested teacher taps (empty without a teacher)
    epoch: int                            # 0-based
    epochs: int
    teachers: list = None                 # every teacher's taps (teacher_mode "all"); [0] is teacher
    index: torch.Tensor | None = None     # the images' indices in the training split

    @property
    def progress(self) -> float:
        """Fraction of the run completed at the start of this epoch, in [0, 1)."""
        return self.epoch / self.epochs


@dataclass
class NoParams:
    pass


class DistillMethod:
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    uses_teacher: ClassVar[bool] = True

    @staticmethod
    def teacher_mode(params) -> str:
        """Which of the job's teachers the method distils from: first | best | all."""
        return "first"

    @classmethod
    def link_teacher_mode(cls, params, link: int, chain: int) -> str:
        """The teacher mode of one link of a chain: the method's own for the first link; later
        links distil from the previous link's student alone."""
        return cls.teacher_mode(params) if link == 1 else "first"

    @classmethod
    def plan(cls, plan, label: str, entry: dict, params) -> list:
        """Add this method's units for one seed to `plan` (a raykd.driver.plan.SeedPlan). The default:
        one student, or a chain of students (`chain: N`), each the next one's teacher. Methods
        that need more (heads, neighbourhoods) extend this."""
        return plan.students(label, cls.name, entry, params, cls)

    @classmethod
    def prepare(cls, unit, rows: list[dict]) -> None:
        """Last decisions about a planned unit, made at launch from the finished units' results
        rows (e.g. which distilled parts to stitch). Nothing by default."""

    # the label suffix of a results row for the model a student starts from (see `start_model`)
    @staticmethod
    def warmup_fraction(params) -> float:
        """The share of a run at whose start this method's student is not yet trained on its
        own loss (an Early Decay Teacher's CD-only warm-up): a sweep scheduler must not compare
        trials inside it."""
        return 0.0

    start_label: ClassVar[str] = "start"

    @classmethod
    def start_model(cls, unit, splits, device, calibrate: bool = True) -> nn.Module | None:
        """The trained model this unit's student starts from, where the method makes one (a
        stitched student); None: the job's student (a zoo model, or `student.checkpoint`).
        `calibrate`: it will be trained or scored, not only looked at for its shapes."""
        return None

    def __init__(self, params: Any, ctx: MethodContext):
        self.params = params
        self.ctx = ctx

    def student_taps(self) -> list[str]:
        return [LOGITS]

    def teacher_taps(self) -> list[str]:
        return [LOGITS] if self.uses_teacher else []

    def score_names(self) -> list[str]:
        """The class scores this method distils from, by name: what a replayed teacher stores
        per view (raykd.teacher.replay). The teacher's logits for a method that reads nothing
        else of the teacher; [] for one that reads its features (it needs the teacher online)."""
        return [LOGITS] if self.teacher_taps() == [LOGITS] else []

    def teacher_scores(self, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The scores of `score_names`, computed from the teacher's taps (batch x classes). A
        replaying student's `Step.teacher` holds these (as log-probabilities) instead of taps."""
        return {name: teacher[name] for name in self.score_names()}

    def modules(self) -> nn.Module | None:
        """Extra trainable modules (trained with the student, not exported)."""
        return None

    def losses(self, step: Step) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """The weights in force this epoch (logged per epoch as w_NAME); constant by default."""
        return {}

    def diagnostics(self, step: Step) -> dict[str, torch.Tensor] | None:
        """Optional per-sample values to store for analysis (raykd results summarises them)."""
        return None


_METHODS: dict[str, type[DistillMethod]] = {}


def needs_teacher(ctx: MethodContext, name: str) -> StagedModel:
    if ctx.teacher is None:
        raise RaykdError(f"{name} needs a teacher")
    return ctx.teacher


def paired_stages(ctx: MethodContext, name: str, what: str) -> list[tuple[str, str]]:
    """The student's and the teacher's stages, paired one to one (one line when the counts
    differ: `what` the method does with a pair)."""
    s_stages, t_stages = ctx.student.stage_names, needs_teacher(ctx, name).stage_names
    if len(s_stages) != len(t_stages):
        raise RaykdError(f"{name}: the student has {len(s_stages)} stages and the teacher "
                         f"{len(t_stages)}; {what} pairs them one to one")
    return list(zip(s_stages, t_stages))


def register_method(name: str):
    def deco(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str, where: str = "method") -> type[DistillMethod]:
    if name not in _METHODS:
        raise RaykdError(f"{where}: unknown method {name!r}; allowed: {', '.join(method_names())}")
    return _METHODS[name]


def parse_params(cls: type[DistillMethod], values: dict, where: str):
    """A method's typed parameters from plain values; one-line errors name `where`."""
    params = from_dict(cls.Params, dict(values), where)
    check = getattr(params, "check", None)
    if check is not None:
        check(where)
    return params


def method_params(label: str, entry: dict) -> tuple[type[DistillMethod], Any]:
    """Resolve a `methods:` entry to its class and typed parameters."""
    entry = dict(entry or {})
    name = entry.pop("method", label)
    chain = entry.pop("chain", 1)
    if not isinstance(chain, int) or isinstance(chain, bool) or chain < 1:
        raise RaykdError(f"methods.{label}.chain must be a positive integer, got {chain!r}")
    cls = method_class(name, f"methods.{label}")
    return cls, parse_params(cls, entry, f"methods.{label}")


def build_method(name: str, values: dict, ctx: MethodContext) -> DistillMethod:
    """The method registered as `name` with parameters `values` (a unit's method entry)."""
    cls = method_class(name)
    return cls(parse_params(cls, values, f"method {name}"), ctx)
