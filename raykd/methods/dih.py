"""DIH: distillation via intermediate classifier heads.

Paper: A. Asadian, A. Salehi-Abari, "Distilling Knowledge via Intermediate Classifiers", 2021,
arXiv:2103.00497.

Heads on the frozen teacher's stages are trained first (their own Ray Train runs, see
raykd.train.heads); the student then distils from the cohort of heads plus the teacher's own
classifier. The cohort's logits come from one teacher pass per batch: the teacher serves the stage
maps and logits, and the frozen heads run here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from raykd.driver.units import HeadsPart
from raykd.errors import RaykdError
from raykd.job.typed import Between, Positive
from raykd.losses import dih_loss
from raykd.methods.base import DistillMethod, Step, needs_teacher, register_method
from raykd.models.export import load_heads
from raykd.models.heads import build_heads, check_stages
from raykd.teacher.local import freeze

HEADS = "heads"   # a DIH student's method input: its trained heads' exports, as planned


@dataclass
class DIHParams:
    alpha: Annotated[float, Between(0, 1)] = 0.1
    temperature: Annotated[float, Positive] = 5.0
    ce_once: bool = False            # count CE once instead of once per cohort member
    heads: list[str] = field(default_factory=list)     # teacher stages with heads; [] = all
    # per member: heads in order, then teacher
    alphas: list[Annotated[float, Between(0, 1)]] = field(default_factory=list)


@register_method("dih")
class DIH(DistillMethod):
    Params = DIHParams

    @classmethod
    def plan(cls, plan, label: str, entry: dict, params: DIHParams) -> list:
        """Per chain link, heads on that link's teacher (the job's teacher for the first link,
        the previous student after it), trained before the link's student: a student never
        distils from untrained heads. Heads on the job's teacher are shared by every DIH entry
        that asks for the same ones; `heads.layout: separate` trains one run per head."""
        spec = plan.spec
        together = spec.heads.layout == "together"
        heads_made: list = []

        def link_heads(link: int, teachers: list[str], teacher_keys: list[str]) -> dict:
            if link == 1:
                arch, model, prefix = plan.teacher_arch, spec.teacher.model, f"seed{plan.seed}"
            else:
                arch = plan.student_arch
                model, prefix = spec.student.model, f"seed{plan.seed}-{label}.{link - 1}"
            stages = check_stages(arch, params.heads, f"methods.{label}.heads")
            everything = stages == arch.stage_names
            units = []
            for group in [stages] if together else [[s] for s in stages]:
                key = (f"{prefix}-heads" + ("" if everything else "-" + "+".join(group))
                       if together else f"{prefix}-head-{group[0]}")
                units.append(plan.add(plan.unit(
                    key, role="head", kind="heads", label="heads", model=model,
                    optim=spec.heads.train, teacher_candidates=teachers[:1],
                    depends_on=teacher_keys[:1], payload=HeadsPart(group, spec.heads.pooled),
                    # together or separate: the same initialisation and batch order per head
                    seed_stream=f"{prefix}-heads")))
            heads_made.extend(units)
            plan.store_outputs(teacher_keys[:1], stages)   # read on train, val and test
            return {"depends_on": [u.key for u in units],
                    "method_inputs": {HEADS: [u.export_path for u in units]}}

        students = plan.students(label, cls.name, entry, params, cls, per_link=link_heads)
        return heads_made + students

    def __init__(self, params: DIHParams, ctx):
        super().__init__(params, ctx)
        needs_teacher(ctx, "dih")
        self.stages = check_stages(ctx.teacher, params.heads, "dih.heads")
        if params.alphas and len(params.alphas) != len(self.stages) + 1:
            raise RaykdError(f"dih: alphas needs {len(self.stages) + 1} weights (one per head, "
                             f"then the teacher's classifier), got {len(params.alphas)}")
        heads = load_heads(ctx.inputs[HEADS]) if ctx.inputs.get(HEADS) else None
        if heads is None and ctx.shapes_only:   # the start-up check: shapes, not training
            heads = build_heads(ctx.teacher, self.stages, ctx.input_shape, ctx.num_classes, False, 0)
        if heads is None:
            raise RaykdError("dih: no trained heads for its teacher; they are trained first "
                             "(plan a dih method through a job, not by hand)")
        missing = [s for s in self.stages if s not in heads]
        if missing:
            raise RaykdError(f"dih: no trained head for {missing[0]}")
        self.heads = {s: freeze(heads[s]) for s in self.stages}

    def teacher_taps(self):
        return self.stages + ["logits"]

    def score_names(self):
        return [f"head:{s}" for s in self.stages] + ["logits"]

    def teacher_scores(self, teacher):
        """The cohort's logits: each frozen head on its stage's map, then the teacher's."""
        scores = {}
        for s in self.stages:
            head = self.heads[s].to(teacher[s].device)
            scores[f"head:{s}"] = head(teacher[s]).detach()
        return {**scores, "logits": teacher["logits"]}

    def losses(self, step: Step):
        p = self.params
        names = self.score_names()
        # a replaying student's step holds the cohort's scores already (raykd.teacher.replay)
        scores = step.teacher if all(n in step.teacher for n in names) \
            else self.teacher_scores(step.teacher)
        cohort = [scores[n] for n in names]
        alpha = p.alphas if p.alphas else p.alpha
        return {"dih": dih_loss(step.student["logits"], cohort, step.y, alpha, p.temperature,
                                p.ce_once)}
