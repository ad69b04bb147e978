"""Relational knowledge distillation: distances and angles between examples' embeddings.

Paper: W. Park, D. Kim, Y. Lu, M. Cho, "Relational Knowledge Distillation", 2019,
arXiv:1904.05068. The embeddings are the last stage's outputs, average-pooled (the penultimate
features a classifier reads, as mdistiller's `pooled_feat`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from raykd.job.typed import NonNegative
from raykd.losses import rkd_loss
from raykd.methods.base import DistillMethod, Step, needs_teacher, register_method


@dataclass
class RKDParams:
    distance: Annotated[float, NonNegative] = 25.0
    angle: Annotated[float, NonNegative] = 50.0
    ce: Annotated[float, NonNegative] = 1.0


def embedding(feature: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(feature, 1).flatten(1) if feature.dim() == 4 else feature.flatten(1)


@register_method("rkd")
class RelationalKD(DistillMethod):
    Params = RKDParams

    def __init__(self, params: RKDParams, ctx):
        super().__init__(params, ctx)
        needs_teacher(ctx, "rkd")
        self.s_tap, self.t_tap = ctx.student.stage_names[-1], ctx.teacher.stage_names[-1]

    def student_taps(self):
        return [self.s_tap, "logits"]

    def teacher_taps(self):
        return [self.t_tap]

    def losses(self, step: Step):
        p = self.params
        return {"ce": p.ce * F.cross_entropy(step.student["logits"], step.y),
                "rkd": rkd_loss(embedding(step.student[self.s_tap]),
                                embedding(step.teacher[self.t_tap]), p.distance, p.angle)}
