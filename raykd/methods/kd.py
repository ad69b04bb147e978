"""The student alone (cross-entropy) and vanilla KD, with Tang et al.'s teacher transforms as an
option of KD.

Papers: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015,
arXiv:1503.02531; J. Tang, R. Shivanna, Z. Zhao, D. Lin, A. Singh, E. H. Chi, S. Jain,
"Understanding and Improving Knowledge Distillation", 2020, arXiv:2002.03532.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from raykd.errors import RaykdError
from raykd.losses import kd_loss, reweighting_factor, soft_target_kd_loss
from raykd.methods.base import DistillMethod, Step, register_method
from raykd.teacher_transforms import (
    Transform,
    classifier_weights,
    similarity_targets,
    transform_teacher,
)


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
    transform: Transform = "none"  # none | ls | pt | sim | topk (Tang et al.)
    k: int = 3                   # topk: how many of the teacher's probabilities to keep
    epsilon: float = 0.1         # ls: smoothing mass
    sim_temperature: float = 0.1  # sim: softmax temperature over cosine class similarities
    teachers: Literal["first", "best", "ensemble"] = "first"   # with several teachers: the
    # first, the best on val, or the ensemble (mean logits)

    def check(self, where: str) -> None:
        if self.temperature <= 0:
            raise RaykdError(f"{where}.temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise RaykdError(f"{where}.alpha must be in [0, 1], got {self.alpha}")
        if self.k < 1:
            raise RaykdError(f"{where}.k must be at least 1, got {self.k}")
        if not 0 <= self.epsilon <= 1:
            raise RaykdError(f"{where}.epsilon must be in [0, 1], got {self.epsilon}")


@register_method("kd")
class VanillaKD(DistillMethod):
    """L = (1 - a) CE(z_s, y) + a T^2 KL(q || p^T(z_s)), q = transform(p^T(z_t))."""
    Params = KDParams

    @staticmethod
    def teacher_mode(params: KDParams) -> str:
        return {"first": "first", "best": "best", "ensemble": "all"}[params.teachers]

    def __init__(self, params: KDParams, ctx):
        super().__init__(params, ctx)
        if params.transform == "topk" and params.k > ctx.num_classes:
            raise RaykdError(f"kd: k={params.k} exceeds the {ctx.num_classes} classes")
        self.similarity = None
        if params.transform == "sim":
            if ctx.teacher is None:
                raise RaykdError("kd transform 'sim' needs the teacher's classifier")
            self.similarity = similarity_targets(classifier_weights(ctx.teacher),
                                                 params.sim_temperature)

    @staticmethod
    def teacher_logits(step: Step):
        """The teacher's logits; with an ensemble, the mean of its members' logits."""
        if step.teachers and len(step.teachers) > 1:
            return torch.stack([t["logits"] for t in step.teachers]).mean(0)
        return step.teacher["logits"]

    def target(self, step: Step):
        p = self.params
        probs = F.softmax(self.teacher_logits(step).detach() / p.temperature, dim=1)
        return transform_teacher(p.transform, probs, step.y, k=p.k, epsilon=p.epsilon,
                                 similarity=self.similarity)

    def losses(self, step: Step):
        p = self.params
        z_s = step.student["logits"]
        if p.transform == "none":
            soft = kd_loss(z_s, self.teacher_logits(step), p.temperature)
        else:
            soft = soft_target_kd_loss(z_s, self.target(step), p.temperature)
        return {"ce": (1 - p.alpha) * F.cross_entropy(z_s, step.y), "kd": p.alpha * soft}

    def diagnostics(self, step: Step):
        """Tang et al.'s per-example gradient re-weighting w at T=1 with teacher weight alpha,
        for the distribution actually distilled (the transformed teacher), and the teacher's
        own true-class confidence."""
        p = self.params
        teacher_probs = F.softmax(self.teacher_logits(step).detach(), dim=1)
        distilled = transform_teacher(p.transform, teacher_probs, step.y, k=p.k,
                                      epsilon=p.epsilon, similarity=self.similarity)
        return {
            "reweight": reweighting_factor(step.student["logits"], distilled, step.y, p.alpha),
            "teacher_true_conf": teacher_probs.gather(1, step.y[:, None]).squeeze(1),
        }
