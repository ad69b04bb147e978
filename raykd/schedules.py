"""Loss-weight schedules: small serialisable objects, evaluated per 0-based epoch.

Steps are given as fractions of the run, so a 10-epoch run keeps the shape of a 200-epoch recipe.
The conventions are those of Channel Distillation's official code (1-based epochs e there):
- a weight *decay* at fraction f is in force from epoch e = round(f * epochs), i.e. from 0-based
  epoch round(f * epochs) - 1 (the code's `factor ** (e // 30)` already decays at e = 30);
- a *warm-up* of fraction w keeps a weight at 0 while e <= round(w * epochs), i.e. it is on from
  0-based epoch round(w * epochs) (the code's `0 if e <= 30 else ...`).
"""
from __future__ import annotations

from dataclasses import dataclass, field


def decay_epoch(fraction: float, epochs: int) -> int:
    """The first 0-based epoch with a decay at `fraction` in force."""
    return max(0, round(fraction * epochs) - 1)


def warmup_end(fraction: float, epochs: int) -> int:
    """The first 0-based epoch after a warm-up of `fraction`."""
    return round(fraction * epochs)


@dataclass
class Constant:
    value: float

    def __call__(self, epoch: int, epochs: int) -> float:
        return self.value


@dataclass
class StepDecay:
    """base * factor^(number of decays in force)."""
    base: float
    factor: float
    at: list[float] = field(default_factory=list)

    def __call__(self, epoch: int, epochs: int) -> float:
        steps = sum(1 for f in self.at if epoch >= decay_epoch(f, epochs))
        return self.base * self.factor ** steps


@dataclass
class WarmUpGate:
    """0 during the warm-up fraction of the run, base from then on."""
    base: float
    start: float

    def __call__(self, epoch: int, epochs: int) -> float:
        return self.base if epoch >= warmup_end(self.start, epochs) else 0.0


def channel_distillation_schedule(ce: float, gkd: float, cd: float, edt: bool, warmup: float,
                                  decay: float, decay_at: list[float]) -> dict[str, object]:
    """Zhou et al.'s weights, as in the official code: the CD weight decays by `decay` at each
    fraction in `decay_at` (ImageNet: every 30 of 100 epochs with or without EDT; CIFAR-100 with
    EDT: epochs 60 and 160 of 200); Early Decay Teacher adds a CD-only warm-up (CE and GKD off)."""
    gate = (lambda base: WarmUpGate(base, warmup)) if edt else Constant
    return {"ce": gate(ce), "gkd": gate(gkd), "cd": StepDecay(cd, decay, list(decay_at))}
