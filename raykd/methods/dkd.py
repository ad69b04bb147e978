"""Decoupled knowledge distillation, as mdistiller runs it.

Paper: B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge Distillation", 2022,
arXiv:2203.08679.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch.nn.functional as F

from raykd.job.typed import Between, NonNegative, Positive
from raykd.losses import dkd_loss
from raykd.methods.base import DistillMethod, Step, register_method


@dataclass
class DKDParams:
    alpha: Annotated[float, NonNegative] = 1.0      # TCKD weight
    beta: Annotated[float, NonNegative] = 8.0       # NCKD weight (mdistiller's CIFAR setting)
    temperature: Annotated[float, Positive] = 4.0
    ce: Annotated[float, NonNegative] = 1.0
    # DKD's weight grows linearly over this fraction of the run (mdistiller: 20 of 240 epochs)
    warmup: Annotated[float, Between(0, 1)] = 20 / 240


@register_method("dkd")
class DecoupledKD(DistillMethod):
    """L = ce CE + min(e / (warmup E), 1) (alpha TCKD + beta NCKD), e the 1-based epoch as in
    mdistiller's DKD (whose first epoch already has weight 1/20)."""
    Params = DKDParams

    def loss_weights(self, epoch, epochs):
        p = self.params
        ramp = (epoch + 1) / (p.warmup * epochs) if p.warmup > 0 else 1.0
        return {"ce": p.ce, "dkd": min(ramp, 1.0)}

    def losses(self, step: Step):
        p, w = self.params, self.loss_weights(step.epoch, step.epochs)
        z_s = step.student["logits"]
        return {"ce": w["ce"] * F.cross_entropy(z_s, step.y),
                "dkd": w["dkd"] * dkd_loss(z_s, step.teacher["logits"], step.y, p.alpha, p.beta,
                                           p.temperature)}
