"""The in-process teacher: the frozen model on the training worker's own device."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

import torch

from raykd.models import StagedModel
from raykd.models.export import load_export


class Teacher(Protocol):
    model: StagedModel   # the architecture (for shapes); its weights are frozen

    def features(self, x: torch.Tensor, taps: Iterable[str]) -> dict[str, torch.Tensor]: ...


def freeze(model: StagedModel) -> StagedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class LocalTeacher:
    def __init__(self, export_path: str | Path, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = freeze(load_export(export_path).to(self.device))

    @torch.no_grad()
    def features(self, x: torch.Tensor, taps: Iterable[str]) -> dict[str, torch.Tensor]:
        return self.model.features(x.to(self.device), list(taps))
