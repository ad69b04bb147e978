"""Distillation from a stronger teacher by relations of probabilities, as its authors' code
runs it.

Paper: T. Huang, S. You, F. Wang, C. Qian, C. Xu, "Knowledge Distillation from A Stronger
Teacher", 2022, arXiv:2205.10536.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch.nn.functional as F

from raykd.job.typed import NonNegative, Positive
from raykd.losses import dist_loss
from raykd.methods.base import DistillMethod, Step, register_method


@dataclass
class DISTParams:
    beta: Annotated[float, NonNegative] = 1.0       # inter-class relation
    gamma: Annotated[float, NonNegative] = 1.0      # intra-class relation
    tau: Annotated[float, Positive] = 1.0
    ce: Annotated[float, NonNegative] = 1.0


@register_method("dist")
class DIST(DistillMethod):
    """L = ce CE + beta tau^2 inter + gamma tau^2 intra (Pearson correlations of probabilities)."""
    Params = DISTParams

    def losses(self, step: Step):
        p = self.params
        z_s = step.student["logits"]
        return {"ce": p.ce * F.cross_entropy(z_s, step.y),
                "dist": dist_loss(z_s, step.teacher["logits"], p.beta, p.gamma, p.tau)}
