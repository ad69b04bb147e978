"""The staged-model protocol every raykd model follows.

A staged model is an ordered list of named blocks. Running the blocks in order is the plain
forward pass; the output of any block can be *tapped* by name. Stage names ("stage1", ...) are
aliases for the block that ends each residual stage, and "logits" names the final block's output.
Teacher shards, neighbourhoods and feature-based methods all address a model through these names,
so no code ever depends on a model's module layout or positional indices.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from raykd.errors import RaykdError

LOGITS = "logits"


class StagedModel(nn.Module):
    def __init__(self, blocks: "OrderedDict[str, nn.Module]", stages: dict[str, str],
                 paths: dict[str, str] | None = None):
        """`paths`: module paths of the original model (`layer3.1`) -> the block ending where
        that module ends, for a model cut from any `nn.Module` (raykd.models.graph)."""
        super().__init__()
        if not blocks:
            raise ValueError("a staged model needs at least one block")
        self.blocks = nn.ModuleDict(blocks)
        unknown = [b for b in [*stages.values(), *(paths or {}).values()] if b not in self.blocks]
        if unknown:
            raise ValueError(f"stage boundaries name unknown blocks: {unknown}")
        self.stages = dict(stages)
        self.paths = dict(paths or {})

    # ----- names -------------------------------------------------------------------------
    @property
    def block_names(self) -> list[str]:
        return list(self.blocks.keys())

    @property
    def stage_names(self) -> list[str]:
        return list(self.stages.keys())

    @property
    def tap_names(self) -> list[str]:
        return self.stage_names + self.block_names + [LOGITS]

    def resolve_tap(self, tap: str) -> str:
        """Map a tap name (stage alias, block name or 'logits') to the block whose output it is."""
        if tap == LOGITS:
            return self.block_names[-1]
        if tap in self.stages:
            return self.stages[tap]
        if tap in self.blocks:
            return tap
        if tap in self.paths:
            return self.paths[tap]
        some = self.block_names if not self.paths else list(self.paths)
        raise RaykdError(
            f"unknown tap {tap!r}; allowed: {', '.join(self.stage_names + [LOGITS])} "
            f"or a {'module path' if self.paths else 'block name'} ({', '.join(some[:16])}"
            f"{', ...' if len(some) > 16 else ''})"
        )

    def block_index(self, name: str) -> int:
        return self.block_names.index(self.resolve_tap(name))

    # ----- running -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        return x

    def run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run the contiguous block range [start, stop) on x (the activation entering `start`)."""
        for name in self.block_names[start:stop]:
            x = self.blocks[name](x)
        return x

    def features(self, x: torch.Tensor, taps: Iterable[str]) -> dict[str, torch.Tensor]:
        """Return exactly the requested activations, running only as far as the last one."""
        return self.features_from(x, taps, start=0)

    def features_from(
        self, x: torch.Tensor, taps: Iterable[str], start: int = 0, stop: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Run blocks from `start` and collect requested taps that fall in [start, stop).

        Taps outside that range are ignored, which lets a shard serve its part of a request.
        """
        names = self.block_names
        stop = len(names) if stop is None else stop
        wanted: dict[str, list[str]] = {}
        for tap in taps:
            idx = self.block_index(tap)
            if start <= idx < stop:
                wanted.setdefault(names[idx], []).append(tap)
        if not wanted:
            return {}
        last = max(names.index(b) for b in wanted)
        out: dict[str, torch.Tensor] = {}
        for name in names[start : last + 1]:
            x = self.blocks[name](x)
            for tap in wanted.get(name, ()):
                out[tap] = x
        return out


def weights_checksum(module: nn.Module) -> str:
    """A short hash of every tensor in the module's state (names included)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@contextmanager
def mode(model: nn.Module, training: bool):
    """`model` in training or evaluation mode for the duration, then *every submodule* back to
    its own mode. Restoring only the top flag (`model.train(was)`) would be wrong for a wrapper
    around a frozen teacher's blocks (a stitched model, a BlockRange): the new wrapper is in
    training mode, and restoring it would switch the teacher's BatchNorms to batch statistics."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tap_shapes(model: StagedModel, taps: Iterable[str], input_shape) -> dict[str, tuple[int, ...]]:
    """The shape (without the batch dimension) of each requested tap for one input, from one
    forward pass in eval mode (the model's mode is restored)."""
    taps = list(taps)
    with mode(model, False), torch.no_grad():
        feats = model.features(torch.zeros(1, *input_shape), taps)
    return {t: tuple(feats[t].shape[1:]) for t in taps}


def nonnegative_taps(model: StagedModel, taps: Iterable[str], input_shape, probes: int = 32,
                     seed: int = 0) -> dict[str, bool]:
    """Whether each tap's activation is never negative (it ends in a ReLU) on random inputs, so
    a module that must reproduce it knows whether to end in a ReLU too (a pre-activation Wide
    ResNet's stage outputs are about half negative)."""
    taps = list(taps)
    x = torch.randn(probes, *input_shape, generator=torch.Generator().manual_seed(seed))
    with mode(model, False), torch.no_grad():
        feats = model.features(x, taps)
    return {t: bool((feats[t] >= 0).all()) for t in taps}


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one input: each convolution's output elements
    times its (input channels / groups) x kernel size, each linear layer's output elements times
    its input features. Those are the only layers with multiply-accumulates in raykd's models,
    and the totals equal PyTorch's FlopCounterMode / 2 (tests/test_models.py checks it). Forward
    hooks, not that mode: its first use in a process imports torch._dynamo, 1.6 s that every
    Ray Train worker finishing a unit paid."""
    macs = 0

    def conv(module, inputs, output):
        nonlocal macs
        kernel = math.prod(module.kernel_size)
        if module.transposed:   # each input element is spread over a kernel of outputs
            macs += inputs[0].numel() * module.out_channels // module.groups * kernel
        else:
            macs += output.numel() * module.in_channels // module.groups * kernel

    def linear(module, inputs, output):
        nonlocal macs
        macs += output.numel() * module.in_features

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.modules.conv._ConvNd) else linear)
             for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with mode(model, False), torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return macs


class BlockRange(nn.Module):
    """Blocks [start, stop) of a staged model as one module (to measure a neighbourhood)."""

    def __init__(self, model: StagedModel, start: int, stop: int):
        super().__init__()
        self.model, self.start, self.stop = model, start, stop

    def forward(self, x):
        return self.model.run_blocks(x, self.start, self.stop)


def median_ms(call, runs: int = 30, warmup: int = 5, budget_s: float = 1.0) -> float:
    """Median milliseconds of `call()` over `runs` calls, after `warmup` calls; a slow call (an
    ImageNet ResNet on one thread takes 0.1 s) stops both early once `budget_s` is spent, with
    at least 2 warm-up and 5 timed calls."""
    import statistics

    started = time.perf_counter()
    for i in range(warmup):
        call()
        if i >= 1 and time.perf_counter() - started > budget_s / 2:
            break
    started, times = time.perf_counter(), []
    while len(times) < runs and (len(times) < 5 or time.perf_counter() - started < budget_s):
        began = time.perf_counter()
        call()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


@torch.no_grad()
def latency_ms(module: nn.Module, input_shape: tuple[int, ...], runs: int = 30) -> float:
    """Median CPU latency of one forward pass on one input, on one thread, in milliseconds: the
    deployment-style number a search budget needs (batch 1), not training throughput."""
    import copy

    module = copy.deepcopy(module).cpu().eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.zeros(1, *input_shape)
        return median_ms(lambda: module(x), runs)
    finally:
        torch.set_num_threads(threads)
