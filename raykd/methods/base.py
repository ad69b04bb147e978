"""The method contract (after mdistiller): one small class per method.

A method declares which activations it needs from the student and from the teacher (by tap name),
may own extra trainable modules (connectors, transformations) that train with the student and are
dropped at export, and turns one step's activations into a dict of named, *weighted* losses.
The training loop sums and logs that dict and never looks at which method produced it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from raykd.errors import RaykdError
from raykd.models import LOGITS, StagedModel


@dataclass
class MethodContext:
    """What a method may know when it is built."""
    student: StagedModel
    num_classes: int
    input_shape: tuple[int, int, int]
    teacher: StagedModel | None = None   # architecture only (shapes); its outputs come as tensors
    teachers: list | None = None         # every teacher's architecture, when the method uses all
    heads: dict | None = None            # trained heads on the teacher's stages (DIH), by stage


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
    uses_heads: ClassVar[bool] = False   # needs heads trained on the teacher's stages first
    uses_neighbourhoods: ClassVar[bool] = False   # its student is stitched from distilled parts

    @staticmethod
    def teacher_mode(params) -> str:
        """Which of the job's teachers the method distils from: first | best | all."""
        return "first"

    @staticmethod
    def head_stages(params, teacher: StagedModel, where: str) -> list[str]:
        """The teacher stages this method needs heads on (when uses_heads)."""
        return []

    def __init__(self, params: Any, ctx: MethodContext):
        self.params = params
        self.ctx = ctx

    def student_taps(self) -> list[str]:
        return [LOGITS]

    def teacher_taps(self) -> list[str]:
        return [LOGITS] if self.uses_teacher else []

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


def register_method(name: str):
    def deco(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls
    return deco


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_params(label: str, entry: dict) -> tuple[type[DistillMethod], Any]:
    """Resolve a `methods:` entry to its class and typed parameters."""
    from raykd.config import from_dict

    entry = dict(entry or {})
    name = entry.pop("method", label)
    chain = entry.pop("chain", 1)
    if not isinstance(chain, int) or isinstance(chain, bool) or chain < 1:
        raise RaykdError(f"methods.{label}.chain must be a positive integer, got {chain!r}")
    if name not in _METHODS:
        raise RaykdError(f"methods.{label}: unknown method {name!r}; allowed: {', '.join(method_names())}")
    cls = _METHODS[name]
    params = from_dict(cls.Params, entry, f"methods.{label}")
    check = getattr(params, "check", None)
    if check is not None:
        check(f"methods.{label}")
    return cls, params


def build_method(label: str, entry: dict, ctx: MethodContext) -> DistillMethod:
    cls, params = method_params(label, entry)
    return cls(params, ctx)


def params_dict(params) -> dict:
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else {}
