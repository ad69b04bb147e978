"""The student alone (cross-entropy) and vanilla KD (Hinton et al. 2015; METHODS.md section 0)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from raykd.errors import RaykdError
from raykd.losses import kd_loss
from raykd.methods.base import DistillMethod, Step, register_method


@register_method("ce")
class CrossEntropy(DistillMethod):
    """Plain supervised training: the baseline student, and how teachers are trained."""
    uses_teacher = False

    def losses(self, step: Step):
        return {"ce": F.cross_entropy(step.student["logits"], step.y)}


@dataclass
class KDParams:
    temperature: float = 4.0
    alpha: float = 0.9           # weight of the soft term; CE gets 1 - alpha

    def check(self, where: str) -> None:
        if self.temperature <= 0:
            raise RaykdError(f"{where}.temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise RaykdError(f"{where}.alpha must be in [0, 1], got {self.alpha}")


@register_method("kd")
class VanillaKD(DistillMethod):
    """L = (1 - a) CE(z_s, y) + a T^2 KL(p^T(z_t) || p^T(z_s))."""
    Params = KDParams

    def losses(self, step: Step):
        p = self.params
        return {
            "ce": (1 - p.alpha) * F.cross_entropy(step.student["logits"], step.y),
            "kd": p.alpha * kd_loss(step.student["logits"], step.teacher["logits"], p.temperature),
        }
