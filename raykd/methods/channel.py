"""Channel Distillation with Guided KD and Early Decay Teacher.

Paper: Z. Zhou, C. Zhuge, X. Guan, W. Liu, "Channel Distillation: Channel-Wise Attention for
Knowledge Distillation", 2020, arXiv:2006.01683 (schedules as in the authors' official code).

L(e) = w_CE(e) CE + w_GKD(e) GKD + w_CD(e) CD. Each student stage output goes through a connector
(1x1 conv without bias, BatchNorm, ReLU) to the teacher stage's channel count; connectors train
with the student and are not exported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch.nn.functional as F
from torch import nn

from raykd.job.typed import Between, NonNegative, Positive
from raykd.losses import channel_loss, guided_kd_loss
from raykd.methods.base import DistillMethod, Step, paired_stages, register_method
from raykd.models.staged import nonnegative_taps, tap_shapes
from raykd.schedules import channel_distillation_schedule

# CD-weight decay points when a job gives none: with EDT, the official CIFAR-100 recipe (x0.9 at
# epochs 60 and 160 of 200); without, a constant weight (its CIFAR-100 recipe). ImageNet's recipe
# (every 30 of 100 epochs, with or without EDT) is `cd_decay_at: [0.3, 0.6, 0.9]`.
EDT_DECAY_AT = [0.3, 0.8]


@dataclass
class ChannelParams:
    ce: Annotated[float, NonNegative] = 1.0
    gkd: Annotated[float, NonNegative] = 0.1   # CIFAR-100 base weight (ImageNet: 1)
    cd: Annotated[float, NonNegative] = 6.0
    temperature: Annotated[float, Positive] = 1.0
    edt: bool = False             # Early Decay Teacher: a CD-only warm-up
    # EDT: CD-only fraction (30/100 ImageNet, 60/200 CIFAR-100)
    warmup: Annotated[float, Between(0, 1, high_open=True).noting("a fraction of the run")] = 0.3
    cd_decay: float = 0.9
    cd_decay_at: list[float] | None = None   # fractions; None: EDT_DECAY_AT with EDT, else none

    @property
    def decay_points(self) -> list[float]:
        if self.cd_decay_at is not None:
            return list(self.cd_decay_at)
        return list(EDT_DECAY_AT) if self.edt else []


def connector(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    """1x1 conv, BN, and a ReLU only when the teacher's stage output is post-activation (a
    pre-activation network's channel means can be negative; a ReLU could not match them)."""
    layers = [nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))


@register_method("cd")
class ChannelDistillation(DistillMethod):
    Params = ChannelParams

    def __init__(self, params: ChannelParams, ctx):
        super().__init__(params, ctx)
        pairs = paired_stages(ctx, "cd", "channel distillation")
        s_stages, t_stages = [s for s, _ in pairs], [t for _, t in pairs]
        self.stages = s_stages
        s_maps = tap_shapes(ctx.student, s_stages, ctx.input_shape)
        t_maps = tap_shapes(ctx.teacher, t_stages, ctx.input_shape)
        relu = nonnegative_taps(ctx.teacher, t_stages, ctx.input_shape)
        self.connectors = nn.ModuleList(connector(s_maps[a][0], t_maps[b][0], relu[b])
                                        for a, b in zip(s_stages, t_stages))
        p = params
        self.schedule = channel_distillation_schedule(p.ce, p.gkd, p.cd, p.edt, p.warmup,
                                                      p.cd_decay, p.decay_points)

    @staticmethod
    def warmup_fraction(params) -> float:
        return params.warmup if params.edt else 0.0

    def student_taps(self):
        return self.stages + ["logits"]

    def teacher_taps(self):
        return self.stages + ["logits"]

    def modules(self):
        return self.connectors

    def loss_weights(self, epoch, epochs):
        return {name: w(epoch, epochs) for name, w in self.schedule.items()}

    def losses(self, step: Step):
        w = self.loss_weights(step.epoch, step.epochs)
        z_s, z_t = step.student["logits"], step.teacher["logits"]
        connected = [c(step.student[s]) for c, s in zip(self.connectors, self.stages)]
        return {
            "ce": w["ce"] * F.cross_entropy(z_s, step.y),
            "gkd": w["gkd"] * guided_kd_loss(z_s, z_t, step.y, self.params.temperature),
            "cd": w["cd"] * channel_loss(connected, [step.teacher[s] for s in self.stages]),
        }
