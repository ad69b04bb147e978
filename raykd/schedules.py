"""Loss-weight schedules: small serialisable objects, evaluated per epoch.

Steps are given as fractions of the run, so a 10-epoch run keeps the shape of a 200-epoch recipe.
A step at fraction f takes effect from epoch round(f * epochs) (0-based), the same rounding as the
learning-rate milestones: 0.3 of 200 epochs is epoch 60.
"""
from __future__ import annotations

from dataclasses import dataclass, field


def step_epoch(fraction: float, epochs: int) -> int:
    return round(fraction * epochs)


@dataclass
class Constant:
    value: float

    def __call__(self, epoch: int, epochs: int) -> float:
        return self.value


@dataclass
class StepDecay:
    """base * factor^(number of steps reached)."""
    base: float
    factor: float
    at: list[float] = field(default_factory=list)

    def __call__(self, epoch: int, epochs: int) -> float:
        steps = sum(1 for f in self.at if epoch >= step_epoch(f, epochs))
        return self.base * self.factor ** steps


@dataclass
class WarmUpGate:
    """0 before the warm-up fraction of the run, base from then on."""
    base: float
    start: float

    def __call__(self, epoch: int, epochs: int) -> float:
        return self.base if epoch >= step_epoch(self.start, epochs) else 0.0


def early_decay_teacher(ce: float, gkd: float, cd: float, warmup: float, decay: float,
                        decay_at: list[float]) -> dict[str, object]:
    """Zhou et al.'s EDT, as in the official code: a CD-only warm-up (CE and GKD off), then their
    base weights; the CD weight decays by `decay` at each step in `decay_at`."""
    return {"ce": WarmUpGate(ce, warmup), "gkd": WarmUpGate(gkd, warmup),
            "cd": StepDecay(cd, decay, list(decay_at))}
