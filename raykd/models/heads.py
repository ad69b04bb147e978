"""Classifier heads on a frozen teacher's intermediate stages (DIH).

A head is one linear layer on the *flattened* stage output, as in the paper's code; `pooled`
heads average-pool first (for large maps, e.g. ImageNet). Heads share nothing, so training them
one per run or all in one run gives the same weights for the same batch order.
"""
from __future__ import annotations

import torch
from torch import nn

from raykd.errors import RaykdError
from raykd.models.staged import tap_shapes


class StageHead(nn.Module):
    def __init__(self, in_shape: tuple[int, ...], num_classes: int, pooled: bool = False):
        super().__init__()
        self.in_shape, self.pooled = tuple(in_shape), pooled
        features = in_shape[0] if pooled else int(torch.tensor(in_shape).prod())
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x):
        x = x.mean(dim=(2, 3)) if self.pooled else x.flatten(1)
        return self.fc(x)


def check_stages(model, stages: list[str], where: str) -> list[str]:
    """The stages to put heads on (all when empty); a clear error for one that doesn't exist."""
    if not stages:
        return list(model.stage_names)
    bad = [s for s in stages if s not in model.stage_names]
    if bad:
        raise RaykdError(f"{where}: the teacher has no stage {bad[0]!r}; it has "
                         f"{', '.join(model.stage_names)}")
    return list(stages)


def build_heads(model, stages: list[str], input_shape, num_classes: int, pooled: bool,
                seed: int) -> nn.ModuleDict:
    """Each head initialised from its own seed (seed, stage index), independent of the others."""
    shapes = tap_shapes(model, stages, input_shape)
    heads = nn.ModuleDict()
    for stage in stages:
        torch.manual_seed(seed * 1000 + model.stage_names.index(stage))
        heads[stage] = StageHead(shapes[stage], num_classes, pooled)
    return heads
