"""Attention transfer: the student's spatial attention maps matched to the teacher's at every
stage pair.

Paper: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", 2017, arXiv:1612.03928.
The weight follows the authors' code (szagoruyko/attention-transfer): `beta / 2 * sum` of the
per-pair losses with beta = 1000, so 500 per pair; mdistiller uses 1000 without the half.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch.nn.functional as F

from raykd.job.typed import NonNegative, Positive
from raykd.losses import attention_loss
from raykd.methods.base import DistillMethod, Step, paired_stages, register_method


@dataclass
class ATParams:
    beta: Annotated[float, NonNegative] = 1000.0    # the loss is beta / 2 times the pairs' sum
    p: Annotated[float, Positive] = 2.0             # attention map: channel mean of |F|^p
    ce: Annotated[float, NonNegative] = 1.0


@register_method("at")
class AttentionTransfer(DistillMethod):
    Params = ATParams

    def __init__(self, params: ATParams, ctx):
        super().__init__(params, ctx)
        self.pairs = paired_stages(ctx, "at", "attention transfer")

    def student_taps(self):
        return [s for s, _ in self.pairs] + ["logits"]

    def teacher_taps(self):
        return [t for _, t in self.pairs]

    def losses(self, step: Step):
        p = self.params
        at = attention_loss([step.student[s] for s, _ in self.pairs],
                            [step.teacher[t] for _, t in self.pairs], p.p)
        return {"ce": p.ce * F.cross_entropy(step.student["logits"], step.y),
                "at": p.beta / 2 * at}
