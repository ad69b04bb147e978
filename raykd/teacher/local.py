"""The `Teacher` interface, and its in-process implementation.

Every distillation loop gets teacher outputs only through this interface:
`teacher.submit(x, taps, index)` starts the work and returns a pending result whose `.result()`
is `{tap: tensor}`; `teacher.features(...)` does both. Submitting the next batch before training
on the current one lets actor-served teachers overlap with the student's step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

import torch

from raykd.models import StagedModel
from raykd.models.export import load_export
from raykd.models.staged import weights_checksum


class Pending(Protocol):
    def result(self) -> dict[str, torch.Tensor]: ...


class Teacher(Protocol):
    model: StagedModel   # the architecture (for shapes); its weights are frozen

    def submit(self, x: torch.Tensor, taps: list[str], index: torch.Tensor | None = None) -> Pending: ...

    def features(self, x: torch.Tensor, taps: list[str], index: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]: ...

    def checksum(self) -> str:
        """A hash of the weights that actually compute the outputs (wherever they live)."""


class Done:
    """A pending result that is already there."""

    def __init__(self, value: dict[str, torch.Tensor]):
        self.value = value

    def result(self) -> dict[str, torch.Tensor]:
        return self.value


def freeze(model: StagedModel) -> StagedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class LocalTeacher:
    """The frozen model on the training worker's own device."""

    def __init__(self, export_path: str | Path, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = freeze(load_export(export_path).to(self.device))

    @torch.no_grad()
    def features(self, x: torch.Tensor, taps: Iterable[str], index=None) -> dict[str, torch.Tensor]:
        return self.model.features(x.to(self.device), list(taps))

    def submit(self, x: torch.Tensor, taps: list[str], index=None) -> Done:
        return Done(self.features(x, taps))

    def checksum(self) -> str:
        """Of the weights that compute this teacher's outputs."""
        return weights_checksum(self.model)
