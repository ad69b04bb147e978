"""FEED: feature-level ensemble distillation.

Paper: S. Park, N. Kwak, "FEED: Feature-level Ensemble for Knowledge Distillation", 2019,
arXiv:1909.10754; its transformation follows Factor Transfer (J. Kim, S. Park, N. Kwak,
"Paraphrasing Complex Network: Network Compression via Factor Transfer", 2018, arXiv:1802.04977).

Parallel FEED: K teachers; on the student's feature map one non-linear transformation per
teacher (three 3x3 convs, each followed by LeakyReLU(0.1) as in Factor Transfer's translator,
ending at that teacher's channel count);
L = CE + beta * sum_k mean |N(T_k(F_s)) - N(F_t^k)|. The transformations train with the student
and are dropped at export. Sequential FEED is the same method in a chain (`chain: N` in the
job): the first link distils from one pretrained teacher (teacher 0), each later link from the
previous link's student.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch.nn.functional as F
from torch import nn

from raykd.errors import RaykdError
from raykd.job.typed import NonNegative
from raykd.losses import feed_loss
from raykd.methods.base import DistillMethod, Step, register_method
from raykd.models.staged import tap_shapes


@dataclass
class FEEDParams:
    beta: Annotated[float, NonNegative] = 500.0  # Factor Transfer's default with a mean abs. difference
    student_tap: str = ""         # default: the student's last stage
    teacher_tap: str = ""         # default: each teacher's last stage


def transformation(cin: int, cout: int) -> nn.Sequential:
    """Factor Transfer's translator, which FEED takes for its per-teacher transformation: three
    3x3 conv-BN-LeakyReLU(0.1) layers whose channels go in -> in -> out -> out (the change of
    width happens in the second; RepDistiller's `Translator`, from the FT code)."""
    layers = []
    for a, b in ((cin, cin), (cin, cout), (cout, cout)):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


@register_method("feed")
class FEED(DistillMethod):
    Params = FEEDParams

    @staticmethod
    def teacher_mode(params) -> str:
        return "all"

    @classmethod
    def link_teacher_mode(cls, params, link: int, chain: int) -> str:
        """Parallel FEED distils from all of the seed's teachers; sequential FEED (a chain)
        starts from one pretrained teacher, and each later link from the previous student."""
        return "all" if chain == 1 else "first"

    def __init__(self, params: FEEDParams, ctx):
        super().__init__(params, ctx)
        teachers = ctx.teachers or ([ctx.teacher] if ctx.teacher is not None else [])
        if not teachers:
            raise RaykdError("feed needs at least one teacher")
        self.s_tap = params.student_tap or ctx.student.stage_names[-1]
        self.t_taps = [params.teacher_tap or t.stage_names[-1] for t in teachers]
        ctx.student.resolve_tap(self.s_tap)
        s_shape = tap_shapes(ctx.student, [self.s_tap], ctx.input_shape)[self.s_tap]
        if len(s_shape) != 3:
            raise RaykdError(f"feed: student tap {self.s_tap!r} is not a feature map")
        self.transforms = nn.ModuleList()
        for k, (teacher, tap) in enumerate(zip(teachers, self.t_taps)):
            t_shape = tap_shapes(teacher, [tap], ctx.input_shape)[tap]
            if len(t_shape) != 3 or t_shape[1:] != s_shape[1:]:
                raise RaykdError(
                    f"feed: teacher {k}'s {tap} is {'x'.join(map(str, t_shape))} but the "
                    f"student's {self.s_tap} is {'x'.join(map(str, s_shape))}; the "
                    "transformation keeps the spatial size, so pick taps whose H x W match "
                    "(methods.<label>.student_tap / teacher_tap)")
            self.transforms.append(transformation(s_shape[0], t_shape[0]))
        self.tap = self.t_taps[0] if len(set(self.t_taps)) == 1 else None
        if self.tap is None:
            raise RaykdError("feed: give every teacher the same teacher_tap name")

    def student_taps(self):
        return [self.s_tap, "logits"]

    def teacher_taps(self):
        return [self.tap]

    def modules(self):
        return self.transforms

    def losses(self, step: Step):
        teachers = step.teachers or [step.teacher]
        f_s = step.student[self.s_tap]
        transformed = [t(f_s) for t in self.transforms]
        return {"ce": F.cross_entropy(step.student["logits"], step.y),
                "feed": self.params.beta * feed_loss(transformed, [t[self.tap] for t in teachers])}
