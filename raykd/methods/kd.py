"""The student alone (cross-entropy) and vanilla KD, with Tang et al.'s teacher transforms as an
option of KD.

Papers: G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015,
arXiv:1503.02531; J. Tang, R. Shivanna, Z. Zhao, D. Lin, A. Singh, E. H. Chi, S. Jain,
"Understanding and Improving Knowledge Distillation", 2020, arXiv:2002.03532.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F

from raykd.errors import RaykdError
from raykd.job.typed import AtLeast, Between, Positive
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
    temperature: Annotated[float, Positive] = 4.0
    alpha: Annotated[float, Between(0, 1)] = 0.9   # weight of the soft term; CE gets 1 - alpha
    transform: Transform = "none"  # none | ls | pt | sim | topk (Tang et al.)
    k: Annotated[int, AtLeast(1)] = 3   # topk: how many of the teacher's probabilities to keep
    epsilon: Annotated[float, Between(0, 1)] = 0.1   # ls: smoothing mass
    sim_temperature: float = 0.1  # sim: softmax temperature over cosine class similarities
    teachers: Literal["first", "best", "ensemble"] = "first"   # with several teachers: the
    # first, the best on val, or the ensemble (mean logits)


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

    # Label smoothing and class-similarity targets do not depend on the example's teacher
    # output, so they are distilled untempered (T = 1, no T^2) and the teacher never runs; `ls`
    # is exactly label smoothing with `epsilon` (CE against the smoothed labels, no CE mix).
    UNTEMPERED = ("ls", "sim")

    def weights(self) -> tuple[float, float]:
        """(alpha, temperature) in force for this transform."""
        p = self.params
        if p.transform == "ls":
            return 1.0, 1.0
        if p.transform == "sim":
            return p.alpha, 1.0
        return p.alpha, p.temperature

    def teacher_taps(self):
        return [] if self.params.transform in self.UNTEMPERED else ["logits"]

    @staticmethod
    def teacher_logits(step: Step):
        """The teacher's logits; with an ensemble, the mean of its members' logits."""
        if step.teachers and len(step.teachers) > 1:
            return torch.stack([t["logits"] for t in step.teachers]).mean(0)
        return step.teacher["logits"]

    def target(self, step: Step):
        """The distribution distilled this step (at the temperature in force)."""
        p = self.params
        _, t = self.weights()
        if p.transform in self.UNTEMPERED:
            probs = torch.empty(len(step.y), self.ctx.num_classes, device=step.y.device)
        else:
            probs = F.softmax(self.teacher_logits(step).detach() / t, dim=1)
        return transform_teacher(p.transform, probs, step.y, k=p.k, epsilon=p.epsilon,
                                 similarity=self.similarity)

    def losses(self, step: Step):
        p = self.params
        alpha, t = self.weights()
        z_s = step.student["logits"]
        if p.transform == "none":
            soft = kd_loss(z_s, self.teacher_logits(step), t)
        else:
            soft = soft_target_kd_loss(z_s, self.target(step), t)
        return {"ce": (1 - alpha) * F.cross_entropy(z_s, step.y), "kd": alpha * soft}

    def diagnostics(self, step: Step):
        """Tang et al.'s per-example re-weighting of the true-class gradient (relative to plain
        CE) that this run's loss applies, at its temperature and weight; and the teacher's own
        true-class confidence (where the teacher runs)."""
        alpha, t = self.weights()
        out = {"reweight": reweighting_factor(step.student["logits"], self.target(step), step.y,
                                              alpha, t)}
        if self.teacher_taps():
            teacher_probs = F.softmax(self.teacher_logits(step).detach(), dim=1)
            out["teacher_true_conf"] = teacher_probs.gather(1, step.y[:, None]).squeeze(1)
        return out
