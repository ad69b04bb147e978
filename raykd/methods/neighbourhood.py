"""Neighbourhood Distillation.

Paper: L. Shao, M. Moroz, E. Eban, Y. Movshovitz-Attias, "Neighbourhood Distillation: On the
benefits of non end-to-end distillation", 2020, arXiv:2010.01189.

The teacher is split into neighbourhoods (`groups`: stages or blocks); every (neighbourhood,
candidate) pair is distilled independently and concurrently as its own Ray Train run
(raykd.train.neighbourhood). Then one candidate per neighbourhood is chosen by local quality
(relative reconstruction error on held-out inputs) under an optional parameter budget, stitched
with the teacher's stem and classifier, its BatchNorm statistics recomputed on its own
activations (raykd.models.batchnorm), evaluated, and optionally fine-tuned end to end with KD
(the loss below; `finetune_epochs: 0` only evaluates).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch.nn.functional as F

from raykd.driver.units import Inputs, NeighbourhoodPart
from raykd.errors import RaykdError
from raykd.job.specs import OptimSpec
from raykd.job.typed import AtLeast, Between, NonNegative, Positive
from raykd.losses import kd_loss
from raykd.methods.base import DistillMethod, Step, needs_teacher, parse_params, register_method
from raykd.models import count_params
from raykd.models.batchnorm import recalibrate_batchnorm
from raykd.models.export import build_stitched, load_export
from raykd.models.stitch import (
    boundary_taps,
    candidate_neighbourhoods,
    neighbourhoods,
    parse_candidate,
    pools,
)
from raykd.nas.selection import choose_one_per_group

DATA_RECALIBRATION = 2048   # training images for a stitched student's BatchNorm, on data inputs
LIBRARY_DIR = "neighbourhoods"   # the default library, inside the job's output folder
# a stitched student's method inputs: its parts' unit keys (planned), then the stitch (chosen)
PARTS, STITCH = "parts", "stitch"


@dataclass
class StitchPlan:
    """A stitched student: the teacher export and, per neighbourhood, its chosen candidate export.
    Stored inside the student's export (as a plain dict) so it can be rebuilt."""
    teacher: str
    parts: list[tuple[int, int, str]]     # (start, stop, candidate export), in block order
    bn_recalibration: int = 0   # training images to recompute its BatchNorm statistics on


@dataclass
class NeighbourhoodParams:
    groups: list[str] = field(default_factory=list)           # [] = one per stage
    candidates: list[str] = field(default_factory=lambda: ["w0.5d1"])
    inputs: Inputs = "data"             # data | gaussian (synthetic, no images)
    gaussian_samples: Annotated[int, AtLeast(1)] = 2048   # synthetic inputs per epoch
    train: OptimSpec = field(default_factory=lambda: OptimSpec(
        epochs=10, optimizer="adam", lr=0.005, weight_decay=0.0))
    max_params: int | None = None       # budget for the stitched student
    # training images to recompute the stitched student's BatchNorm statistics on (0: keep
    # each part's own); None: 2048 on data inputs, 0 on gaussian ones (data-free end to end)
    bn_recalibration: Annotated[int | None, NonNegative.noting("0 turns it off")] = None
    finetune_epochs: Annotated[int, NonNegative] = 0   # end-to-end KD after stitching
    # also train the stitched architecture from scratch with end-to-end KD for this many epochs
    # (the baseline)
    scratch_epochs: Annotated[int, NonNegative] = 0
    temperature: Annotated[float, Positive] = 4.0
    alpha: Annotated[float, Between(0, 1)] = 0.9
    library: str | None = None          # neighbourhood library (default OUTPUT_DIR/neighbourhoods)

    @property
    def recalibration_images(self) -> int:
        if self.bn_recalibration is not None:
            return self.bn_recalibration
        return DATA_RECALIBRATION if self.inputs == "data" else 0

    def check(self, where: str) -> None:
        if not self.candidates:
            raise RaykdError(f"{where}.candidates: give at least one, e.g. [w0.5d1]")
        for c in self.candidates:
            parse_candidate(c)


@register_method("neighbourhood")
class NeighbourhoodDistillation(DistillMethod):
    Params = NeighbourhoodParams

    @classmethod
    def plan(cls, plan, label: str, entry: dict, params: NeighbourhoodParams) -> list:
        """One unit per (neighbourhood, candidate), all independent; then per chain link a
        student stitched from the best parts (and, with `scratch_epochs`, the same architecture
        trained from scratch)."""
        library = params.library or str(Path(plan.spec.output_dir) / LIBRARY_DIR)
        parts = []
        partition = candidate_neighbourhoods(plan.teacher_arch, params.groups,
                                             plan.input_shape, params.candidates)
        boundaries = tuple(sorted({i for _, start, stop in partition for i in (start, stop)}))
        for name, start, stop in partition:
            for cand in params.candidates:
                parts.append(plan.add(plan.unit(
                    f"seed{plan.seed}-{label}-{name}-{cand}", role="neighbourhood",
                    kind="neighbourhood", label=f"{label}:{name}:{cand}", model=cand,
                    optim=params.train, teacher_candidates=plan.exports[:1],
                    depends_on=plan.first_teacher, seed_stream=f"neighbourhood-{name}-{cand}",
                    payload=NeighbourhoodPart(
                        name, start, stop, cand, params.inputs, params.gaussian_samples,
                        tuple(plan.input_shape), library=library, boundaries=boundaries,
                        pool=pools(plan.teacher_arch, start, stop)))))
        if params.inputs == "data":   # every part reads these on train, val and test
            plan.store_outputs(plan.first_teacher, boundary_taps(plan.teacher_arch, boundaries))
        students = plan.students(label, cls.name, entry, params, cls,
                                 depends_on=[p.key for p in parts], model="stitched",
                                 method_inputs={PARTS: [p.key for p in parts]})
        scratch = []
        for student in students:
            student.optim = dataclasses.replace(student.optim, epochs=params.finetune_epochs)
            if params.scratch_epochs:
                scratch.append(plan.add(dataclasses.replace(
                    student, key=f"{student.key}.scratch", label=f"{student.label}.scratch",
                    export_path=student.export_path.replace(".pt", ".scratch.pt"),
                    history_path=student.history_path.replace(".jsonl", ".scratch.jsonl"),
                    diagnostics_dir="", reinit=True, depends_on=list(student.depends_on),
                    optim=dataclasses.replace(student.optim, epochs=params.scratch_epochs))))
        return parts + scratch + students

    @classmethod
    def prepare(cls, unit, rows: list[dict]) -> None:
        """Choose the stitched student's parts: per neighbourhood the candidate with the lowest
        relative reconstruction error, jointly under the parameter budget."""
        if not unit.method_inputs.get(PARTS) or STITCH in unit.method_inputs:
            return
        params = parse_params(cls, unit.method, f"methods.{unit.label}")
        mine = [r for r in rows if r.get("unit") in set(unit.method_inputs[PARTS])]
        teacher = unit.teacher_candidates[0]
        chosen, _ = choose_candidates(mine, count_params(load_export(teacher)), params.max_params)
        plan = StitchPlan(teacher, sorted(
            (int(r["nb_start"]), int(r["nb_stop"]), r["export"]) for r in chosen.values()),
            params.recalibration_images)
        # a new dict: a student and its from-scratch twin were planned sharing one
        unit.method_inputs = {**unit.method_inputs, STITCH: dataclasses.asdict(plan)}

    start_label = "stitched"

    @classmethod
    def start_model(cls, unit, splits, device, calibrate: bool = True):
        """The stitched student: the teacher's stem and classifier around the chosen parts,
        its BatchNorm statistics recomputed on its own activations (unless it is to be trained
        from fresh weights, the from-scratch baseline)."""
        stitch = unit.method_inputs.get(STITCH)
        if stitch is None:
            return None
        model = build_stitched(stitch)
        if calibrate and not unit.reinit and stitch["bn_recalibration"]:
            recalibrate_batchnorm(model.to(device), splits.train, unit.data.eval_batch_size,
                                  stitch["bn_recalibration"], device)
        return model

    def __init__(self, params: NeighbourhoodParams, ctx):
        super().__init__(params, ctx)
        needs_teacher(ctx, "neighbourhood")
        self.plan = neighbourhoods(ctx.teacher, params.groups)

    def losses(self, step: Step):
        p = self.params
        z_s = step.student["logits"]
        return {"ce": (1 - p.alpha) * F.cross_entropy(z_s, step.y),
                "kd": p.alpha * kd_loss(z_s, step.teacher["logits"], p.temperature)}


def choose_candidates(rows: list[dict], teacher_params: int, max_params: int | None
                      ) -> tuple[dict[str, dict], int]:
    """One row per neighbourhood: the combination with the lowest summed relative
    reconstruction error whose stitched parameter count fits the budget (an exact integer
    program: it scales to many neighbourhoods and candidates)."""
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["neighbourhood"], []).append(r)
    groups = list(by_group.values())
    deltas = [[r["params"] - r["replaced_params"] for r in g] for g in groups]
    budgets = [] if max_params is None else [max_params - teacher_params]
    try:
        picks = choose_one_per_group([[r["recon_val"] for r in g] for g in groups],
                                     [deltas] if budgets else [], budgets)
    except RaykdError:
        smallest = teacher_params + sum(min(d) for d in deltas)
        raise RaykdError(f"no stitched student fits max_params={max_params}; the smallest has "
                         f"{smallest} parameters") from None
    chosen = [g[i] for g, i in zip(groups, picks)]
    params = teacher_params + sum(r["params"] - r["replaced_params"] for r in chosen)
    return {r["neighbourhood"]: r for r in chosen}, params
