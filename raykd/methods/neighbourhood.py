"""Neighbourhood Distillation (Shao et al. 2020; METHODS.md section 4).

The teacher is split into neighbourhoods (`groups`: stages or blocks); every (neighbourhood,
candidate) pair is distilled independently and concurrently as its own Ray Train run
(raykd.train.neighbourhood). Then one candidate per neighbourhood is chosen by local quality
(relative reconstruction error on held-out inputs) under an optional parameter budget, stitched
with the teacher's stem and classifier, evaluated, and optionally fine-tuned end to end with KD
(the loss below; `finetune_epochs: 0` only evaluates).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch.nn.functional as F

from raykd.config import OptimSpec
from raykd.errors import RaykdError
from raykd.losses import kd_loss
from raykd.methods.base import DistillMethod, Step, register_method
from raykd.models.stitch import neighbourhoods, parse_candidate


@dataclass
class NeighbourhoodParams:
    groups: list[str] = field(default_factory=list)           # [] = one per stage
    candidates: list[str] = field(default_factory=lambda: ["w0.5d1"])
    inputs: str = "data"                # data | gaussian (synthetic, no images)
    gaussian_samples: int = 2048        # synthetic inputs per epoch
    train: OptimSpec = field(default_factory=lambda: OptimSpec(
        epochs=10, optimizer="adam", lr=0.005, weight_decay=0.0))
    max_params: int | None = None       # budget for the stitched student
    finetune_epochs: int = 0            # end-to-end KD after stitching
    scratch_epochs: int = 0             # also train the stitched architecture from scratch with
                                        # end-to-end KD for this many epochs (the baseline)
    temperature: float = 4.0
    alpha: float = 0.9

    def check(self, where: str) -> None:
        if self.inputs not in ("data", "gaussian"):
            raise RaykdError(f"{where}.inputs: unknown {self.inputs!r}; allowed: data, gaussian")
        if not self.candidates:
            raise RaykdError(f"{where}.candidates: give at least one, e.g. [w0.5d1]")
        for c in self.candidates:
            parse_candidate(c)
        if self.finetune_epochs < 0 or self.scratch_epochs < 0:
            raise RaykdError(f"{where}: finetune_epochs and scratch_epochs must be >= 0")


@register_method("neighbourhood")
class NeighbourhoodDistillation(DistillMethod):
    Params = NeighbourhoodParams
    uses_neighbourhoods = True

    @staticmethod
    def neighbourhood_plan(params: NeighbourhoodParams, teacher) -> list[tuple[str, int, int]]:
        return neighbourhoods(teacher, params.groups)

    def __init__(self, params: NeighbourhoodParams, ctx):
        super().__init__(params, ctx)
        if ctx.teacher is None:
            raise RaykdError("neighbourhood needs a teacher")
        self.plan = neighbourhoods(ctx.teacher, params.groups)

    def losses(self, step: Step):
        p = self.params
        z_s = step.student["logits"]
        return {"ce": (1 - p.alpha) * F.cross_entropy(z_s, step.y),
                "kd": p.alpha * kd_loss(z_s, step.teacher["logits"], p.temperature)}


def choose_candidates(rows: list[dict], teacher_params: int, max_params: int | None
                      ) -> tuple[dict[str, dict], int]:
    """One row per neighbourhood: the combination with the lowest summed relative
    reconstruction error whose stitched parameter count fits the budget."""
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(r["neighbourhood"], []).append(r)
    best, best_cost, best_params = None, float("inf"), None
    for combo in itertools.product(*by_group.values()):
        params = teacher_params + sum(r["params"] - r["replaced_params"] for r in combo)
        if max_params is not None and params > max_params:
            continue
        cost = sum(r["recon_val"] for r in combo)
        if cost < best_cost:
            best, best_cost, best_params = combo, cost, params
    if best is None:
        smallest = min(teacher_params + sum(min(r["params"] - r["replaced_params"] for r in g)
                                            for g in by_group.values()) for _ in [0])
        raise RaykdError(f"no stitched student fits max_params={max_params}; the smallest has "
                         f"{smallest} parameters")
    return {r["neighbourhood"]: r for r in best}, best_params
