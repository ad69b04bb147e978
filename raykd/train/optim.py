"""Optimizer and learning-rate schedule from an `OptimSpec` (milestones are fractions of the run)."""
from __future__ import annotations

import torch

from raykd.job.specs import OptimSpec


def make_optimizer(params, spec: OptimSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum,
                           nesterov=spec.nesterov and spec.momentum > 0,
                           weight_decay=spec.weight_decay)


def milestone_epochs(fractions: list[float], epochs: int) -> list[int]:
    """0.3/0.6/0.9 of 200 epochs -> 60/120/180; short runs keep the shape."""
    return sorted({max(1, round(f * epochs)) for f in fractions})


def make_scheduler(optimizer, spec: OptimSpec):
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestone_epochs(spec.lr_milestones, spec.epochs), gamma=spec.lr_decay)
