"""Data-free inputs for a neighbourhood: per-channel Gaussians at the boundary entering it,
with the statistics the teacher's training images produced there, recovered from the teacher
alone.

Every BatchNorm of the teacher remembers the mean and variance of its input over the training
data (`running_mean`, `running_var`). A batch of images optimised from noise until every
BatchNorm before the boundary sees those statistics (DeepInversion's feature-distribution
term, Yin et al. 2020, "Dreaming to Distill", eq. 3; ZeroQ, Cai et al. 2020, calibrates
quantisation the same way, on "distilled data") carries the teacher's activations through
everything in between (ReLUs, poolings, residual sums) as real images do; the boundary's
per-channel mean and standard deviation are measured on it, and where the boundary follows a
ReLU (it is never negative there) samples come from the Gaussian whose rectification has those
moments. On a `cnn` teacher
trained on digits or mnist5k the per-channel means drawn this way are 2-5x closer to the real
activations' than those of Gaussian noise images pushed through the teacher, the route raykd
took before (`tests/test_neighbourhood.py::test_synthetic_inputs_match_the_real_activations`).

A teacher with no BatchNorm before the boundary (a ViT's tokens, a BatchNorm-free model) has
nothing to match: its boundary is measured on noise images, and the unit says so.
"""
from __future__ import annotations

import torch
from torch import nn

from raykd.models.staged import mode, nonnegative_taps

IMAGES = 256           # images inverted per boundary
STEPS = 100            # Adam steps (lr 0.1) matching the BatchNorm statistics
PRIOR = 1e-4           # weight of the images' L2 prior (keeps them bounded)


def channel_axis(shape: tuple[int, ...]) -> int:
    """Feature maps (C, H, W) keep channels first; token sequences (T, D) keep them last."""
    return 0 if len(shape) != 2 else 1


def batchnorms(model, start: int) -> list[nn.Module]:
    return [m for name in model.block_names[:start] for m in model.blocks[name].modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def inverted_images(model, start: int, input_shape, seed: int) -> torch.Tensor | None:
    """IMAGES inputs whose activations match the running statistics of every BatchNorm in the
    blocks before `start` (None when there is none)."""
    norms = batchnorms(model, start)
    if not norms:
        return None
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0]))) for m in norms]
    x = torch.randn(IMAGES, *input_shape, generator=torch.Generator().manual_seed(seed))
    x.requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.1)
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with mode(model, False):
            for _ in range(STEPS):
                seen.clear()
                model.run_blocks(x, 0, start)
                loss = PRIOR * x.pow(2).mean()
                for bn, a in seen:
                    dims = [d for d in range(a.dim()) if d != 1]
                    loss = loss + torch.linalg.vector_norm(a.mean(dims) - bn.running_mean) + \
                        torch.linalg.vector_norm(a.var(dims) - bn.running_var)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        for h in hooks:
            h.remove()
        for p, was in frozen:
            p.requires_grad_(was)
    return x.detach()


def rectified_gaussian(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mu and sigma such that max(0, N(mu, sigma^2)) has the given mean and standard deviation,
    per element (moment matching of the rectified normal: E = sigma (t Phi(t) + phi(t)) and
    E[X^2] = sigma^2 ((t^2 + 1) Phi(t) + t phi(t)) with t = mu / sigma; their ratio E^2 / E[X^2]
    rises with t, so t is found by bisection)."""
    normal = torch.distributions.Normal(0.0, 1.0)

    def first(t):
        return t * normal.cdf(t) + normal.log_prob(t).exp()

    def ratio(t):
        return first(t) ** 2 / ((t ** 2 + 1) * normal.cdf(t) + t * normal.log_prob(t).exp())

    target = mean ** 2 / (mean ** 2 + std ** 2).clamp_min(1e-12)
    low, high = torch.full_like(mean, -8.0), torch.full_like(mean, 8.0)
    for _ in range(50):
        mid = (low + high) / 2
        below = ratio(mid) < target
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    t = (low + high) / 2
    sigma = mean.clamp_min(1e-6) / first(t)
    return t * sigma, sigma


class SyntheticBoundary:
    """Per-channel Gaussian samples of the activation entering block `start` of a teacher."""

    def __init__(self, model, start: int, input_shape, seed: int):
        names = model.block_names
        images = inverted_images(model, start, input_shape, seed)
        self.source = "images matched to the teacher's BatchNorm statistics"
        if images is None:
            images = torch.randn(IMAGES, *input_shape, generator=torch.Generator().manual_seed(seed))
            self.source = "Gaussian noise images (no BatchNorm before this boundary to match)"
        with mode(model, False), torch.no_grad():
            a = model.run_blocks(images, 0, start)
        self.shape = tuple(a.shape[1:])
        axis = channel_axis(self.shape)
        view = [1] * len(self.shape)
        view[axis] = -1
        others = tuple(d + 1 for d in range(len(self.shape)) if d != axis)
        mean, std = a.mean(dim=(0, *others)), a.std(dim=(0, *others)).clamp_min(1e-3)
        tap = names[start - 1]
        self.rectified = nonnegative_taps(model, [tap], input_shape)[tap]
        if self.rectified:   # the Gaussian before the ReLU whose rectified moments these are
            mean, std = rectified_gaussian(mean, std)
        self.mean, self.std = mean.reshape(view), std.reshape(view)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        a = self.mean + self.std * torch.randn(n, *self.shape, generator=gen)
        return a.clamp_min(0) if self.rectified else a

    def describe(self) -> str:
        return f"per-channel Gaussians measured on {self.source}" + \
            (", rectified (the boundary follows a ReLU)" if self.rectified else "")
