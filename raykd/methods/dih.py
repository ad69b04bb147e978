"""DIH: distillation via intermediate classifier heads (Asadian & Salehi-Abari 2021; METHODS.md 1).

Heads on the frozen teacher's stages are trained first (their own Ray Train runs, see
raykd.train.heads); the student then distils from the cohort of heads plus the teacher's own
classifier. The cohort's logits come from one teacher pass per batch: the teacher serves the stage
maps and logits, and the frozen heads run here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from raykd.errors import RaykdError
from raykd.losses import dih_loss
from raykd.methods.base import DistillMethod, Step, register_method
from raykd.models.heads import build_heads, check_stages
from raykd.teacher.local import freeze


@dataclass
class DIHParams:
    alpha: float = 0.1
    temperature: float = 5.0
    ce_once: bool = False            # count CE once instead of once per cohort member
    heads: list[str] = field(default_factory=list)     # teacher stages with heads; [] = all
    alphas: list[float] = field(default_factory=list)  # per member: heads in order, then teacher

    def check(self, where: str) -> None:
        if not 0 <= self.alpha <= 1 or any(not 0 <= a <= 1 for a in self.alphas):
            raise RaykdError(f"{where}: alpha and alphas must be in [0, 1]")
        if self.temperature <= 0:
            raise RaykdError(f"{where}.temperature must be positive, got {self.temperature}")


@register_method("dih")
class DIH(DistillMethod):
    Params = DIHParams
    uses_heads = True

    @staticmethod
    def head_stages(params: DIHParams, teacher, where: str) -> list[str]:
        return check_stages(teacher, params.heads, f"{where}.heads")

    def __init__(self, params: DIHParams, ctx):
        super().__init__(params, ctx)
        if ctx.teacher is None:
            raise RaykdError("dih needs a teacher")
        self.stages = self.head_stages(params, ctx.teacher, "dih")
        if params.alphas and len(params.alphas) != len(self.stages) + 1:
            raise RaykdError(f"dih: alphas needs {len(self.stages) + 1} weights (one per head, "
                             f"then the teacher's classifier), got {len(params.alphas)}")
        heads = ctx.heads if ctx.heads is not None else build_heads(
            ctx.teacher, self.stages, ctx.input_shape, ctx.num_classes, False, 0)
        missing = [s for s in self.stages if s not in heads]
        if missing:
            raise RaykdError(f"dih: no trained head for {missing[0]}")
        self.heads = {s: freeze(heads[s]) for s in self.stages}

    def teacher_taps(self):
        return self.stages + ["logits"]

    def losses(self, step: Step):
        p = self.params
        cohort = []
        for s in self.stages:
            head = self.heads[s].to(step.teacher[s].device)
            cohort.append(head(step.teacher[s]).detach())
        cohort.append(step.teacher["logits"])
        alpha = p.alphas if p.alphas else p.alpha
        return {"dih": dih_loss(step.student["logits"], cohort, step.y, alpha, p.temperature,
                                p.ce_once)}
