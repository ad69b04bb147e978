"""FitNets: the student's guided layer regressed onto the teacher's hint layer, then KD.

Paper: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio, "FitNets: Hints for
Thin Deep Nets", 2015, arXiv:1412.6550. Its two stages are a schedule of loss weights, not a
second training loop: for the first `hint_fraction` of the run only the hint loss trains (the
student's layers up to the guided one, and the regressor, are the only ones it reaches), then
KD with the hint weight at zero. The regressor (mdistiller's ConvReg: a convolution that maps
the student's map onto the teacher's size and channels, then BatchNorm and ReLU) is the
method's own module and is never exported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch.nn.functional as F
from torch import nn

from raykd.errors import RaykdError
from raykd.job.typed import Between, NonNegative, Positive
from raykd.losses import hint_loss, kd_loss
from raykd.methods.base import DistillMethod, Step, needs_teacher, register_method
from raykd.models.staged import tap_shapes


@dataclass
class FitNetsParams:
    hint_fraction: Annotated[float, Between(0, 1)] = 0.25   # stage 1's share of the run
    hint: Annotated[float, NonNegative] = 1.0
    temperature: Annotated[float, Positive] = 4.0
    alpha: Annotated[float, Between(0, 1)] = 0.9
    student_tap: str = ""    # the guided layer; default: the student's middle stage
    teacher_tap: str = ""    # the hint layer; default: the teacher's middle stage


def regressor(s_shape, t_shape) -> nn.Sequential:
    (s_c, s_h, _), (t_c, t_h, _) = s_shape, t_shape
    if s_h == 2 * t_h:
        conv = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
    elif 2 * s_h == t_h:
        conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
    elif s_h >= t_h:
        conv = nn.Conv2d(s_c, t_c, 1 + s_h - t_h)
    else:
        raise RaykdError(f"fitnets: the guided layer's map ({s_h}x{s_h}) is smaller than the "
                         f"hint's ({t_h}x{t_h}) and not half of it; choose other taps")
    return nn.Sequential(conv, nn.BatchNorm2d(t_c), nn.ReLU())


def middle(stages: list[str]) -> str:
    return stages[(len(stages) - 1) // 2]


@register_method("fitnets")
class FitNets(DistillMethod):
    Params = FitNetsParams

    def __init__(self, params: FitNetsParams, ctx):
        super().__init__(params, ctx)
        needs_teacher(ctx, "fitnets")
        self.s_tap = params.student_tap or middle(ctx.student.stage_names)
        self.t_tap = params.teacher_tap or middle(ctx.teacher.stage_names)
        s_shape = tap_shapes(ctx.student, [self.s_tap], ctx.input_shape)[self.s_tap]
        t_shape = tap_shapes(ctx.teacher, [self.t_tap], ctx.input_shape)[self.t_tap]
        if len(s_shape) != 3 or len(t_shape) != 3:
            raise RaykdError(f"fitnets: {self.s_tap} and {self.t_tap} must be feature maps "
                             f"(C, H, W), got {s_shape} and {t_shape}")
        self.regressor = regressor(s_shape, t_shape)

    def student_taps(self):
        return [self.s_tap, "logits"]

    def teacher_taps(self):
        return [self.t_tap, "logits"]

    def modules(self):
        return self.regressor

    def loss_weights(self, epoch, epochs):
        p = self.params
        hinting = epoch < round(p.hint_fraction * epochs)
        return {"hint": p.hint if hinting else 0.0, "ce": 0.0 if hinting else 1 - p.alpha,
                "kd": 0.0 if hinting else p.alpha}

    def losses(self, step: Step):
        p, w = self.params, self.loss_weights(step.epoch, step.epochs)
        z_s = step.student["logits"]
        return {"hint": w["hint"] * hint_loss(self.regressor(step.student[self.s_tap]),
                                              step.teacher[self.t_tap]),
                "ce": w["ce"] * F.cross_entropy(z_s, step.y),
                "kd": w["kd"] * kd_loss(z_s, step.teacher["logits"], p.temperature)}
