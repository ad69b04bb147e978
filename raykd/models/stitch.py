"""Neighbourhoods of a staged teacher, student candidates for them, and stitching.

A neighbourhood is a contiguous range of the teacher's blocks. A candidate replaces it with the
same input and output shapes. Two families, each with a width and a depth:
- `w<width>d<depth>`: a residual unit of `depth` 3x3 convolutions whose inner width is `width`
  times the neighbourhood's output channels (`w0.5d1`, `w0.25d1`, `w1d2`, ...);
- `dw<width>d<depth>`: a MobileNet-style depthwise-separable unit: a 1x1 expansion to `width`
  times the output channels, `depth` depthwise 3x3 convolutions, a 1x1 projection (`dw1d1`,
  `dw2d1`): far fewer parameters and MACs for the same width.
A candidate downsamples the way its neighbourhood does: where the teacher's blocks there pool
(conv-BN-ReLU-max-pool stages), by a max-pool after its first spatial convolution, run at the input's
resolution; otherwise (strided residual stages) by striding that convolution. A strided
convolution sees one position in four and cannot express a max over a window, so on pooling
teachers it left every part with a large reconstruction error (bench/RESULTS.md, ND section).
Where a cut carries tokens (N, L, C: a ViT's blocks) rather than feature maps, the `w` family is
a residual MLP over the channels instead (`TokenCandidate`): a projection to the output channels
where they differ, then `depth` pre-norm layers LayerNorm-Linear-GELU-Linear of inner width
`width` times the output channels; the token count must stay the same across the neighbourhood.
A stitched student is the teacher's own blocks (stem, classifier,
anything between) with chosen candidates in place of their neighbourhoods.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch.nn.functional as F
from torch import nn

from raykd.errors import RaykdError
from raykd.models.staged import LOGITS, StagedModel, tap_shapes

_CANDIDATE = re.compile(r"^(w|dw)(\d+(?:\.\d+)?)d(\d+)$")
FAMILIES = {"w": "conv", "dw": "depthwise"}


def parse_candidate(spec: str) -> tuple[str, float, int]:
    """(family, width, depth) of a candidate spec."""
    m = _CANDIDATE.match(spec)
    if not m or float(m.group(2)) <= 0 or int(m.group(3)) < 1:
        raise RaykdError(f"unknown candidate {spec!r}; write w<width>d<depth> (residual 3x3 "
                         "convolutions, e.g. w0.5d1) or dw<width>d<depth> (depthwise-separable, "
                         "e.g. dw1d1)")
    return FAMILIES[m.group(1)], float(m.group(2)), int(m.group(3))


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Candidate(nn.Module):
    """The family's body (conv: conv3x3-BN-ReLU x depth; depthwise: 1x1 expand, depthwise
    conv3x3-BN-ReLU x depth), then 1x1 conv-BN to the output channels, plus a projected
    shortcut, then a ReLU only if the neighbourhood's output is post-activation. Downsampling
    happens at the first spatial convolution: by its stride, or with `pool` by a max-pool right
    after it (and before the shortcut's projection). The output is resized to the
    neighbourhood's output size when neither can match it exactly."""

    def __init__(self, spec: str, in_shape: tuple[int, int, int], out_shape: tuple[int, int, int],
                 relu_out: bool = True, pool: bool = False):
        super().__init__()
        family, width, depth = parse_candidate(spec)
        self.relu_out = relu_out   # only where the teacher's boundary is itself post-ReLU
        (cin, hin, _), (cout, hout, _) = in_shape, out_shape
        self.spec, self.in_shape, self.out_shape = spec, tuple(in_shape), tuple(out_shape)
        factor = max(1, round(hin / max(hout, 1)))
        self.pool = pool and factor > 1
        stride = 1 if self.pool else factor

        def downsample() -> list:   # a fresh module for the body and for the shortcut
            return [nn.MaxPool2d(factor)] if self.pool else []

        inner = max(1, round(width * cout))
        if family == "conv":
            layers = _conv_bn_relu(cin, inner, 3, stride) + downsample()
            for _ in range(depth - 1):
                layers += _conv_bn_relu(inner, inner, 3)
        else:   # the downsampling step is the first depthwise convolution
            layers = _conv_bn_relu(cin, inner, 1)
            for i in range(depth):
                layers += _conv_bn_relu(inner, inner, 3, stride if i == 0 else 1, groups=inner)
                layers += downsample() if i == 0 else []
        layers += [nn.Conv2d(inner, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(*downsample(), nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))
        # start from a small output and grow into the neighbourhood's scale, which can be far from
        # BatchNorm's unit variance (a damped last BN, after the zero-init of residual networks)
        for bn in (self.body[-1], self.shortcut[-1]):
            nn.init.constant_(bn.weight, 0.1)

    def forward(self, x):
        out = self.body(x) + self.shortcut(x)
        if tuple(out.shape[-2:]) != self.out_shape[1:]:
            out = F.adaptive_avg_pool2d(out, self.out_shape[1:])
        return F.relu(out) if self.relu_out else out


class TokenCandidate(nn.Module):
    """The `w<width>d<depth>` family for a neighbourhood whose ends are tokens (L, C)."""

    def __init__(self, spec: str, in_shape: tuple[int, int], out_shape: tuple[int, int],
                 relu_out: bool = False, pool: bool = False):
        super().__init__()
        family, width, depth = parse_candidate(spec)
        self.spec, self.in_shape, self.out_shape = spec, tuple(in_shape), tuple(out_shape)
        self.relu_out, self.pool = relu_out, False
        (lin, cin), (lout, cout) = in_shape, out_shape
        if family != "conv":
            raise RaykdError(f"candidate {spec}: this neighbourhood's ends are tokens {in_shape} -> "
                             f"{out_shape}; depthwise (dw) candidates need feature maps, use "
                             "w<width>d<depth>")
        if lin != lout:
            raise RaykdError(f"candidate {spec}: the neighbourhood changes the token count "
                             f"({lin} -> {lout}); token candidates keep it: choose other groups")
        inner = max(1, round(width * cout))
        self.project = nn.Linear(cin, cout) if cin != cout else nn.Identity()
        self.layers = nn.ModuleList(nn.Sequential(
            nn.LayerNorm(cout), nn.Linear(cout, inner), nn.GELU(), nn.Linear(inner, cout))
            for _ in range(depth))
        for layer in self.layers:     # each starts near the identity, as the conv family's
            nn.init.zeros_(layer[-1].weight)   # damped last BatchNorm does
            nn.init.zeros_(layer[-1].bias)

    def forward(self, x):
        x = self.project(x)
        for layer in self.layers:
            x = x + layer(x)
        return F.relu(x) if self.relu_out else x


def make_candidate(spec: str, in_shape: tuple, out_shape: tuple, relu_out: bool = True,
                   pool: bool = False) -> nn.Module:
    """The candidate `spec` for a neighbourhood from `in_shape` to `out_shape` (per image): the
    token family where its ends are (L, C) tokens, the convolutional one for (C, H, W) maps."""
    if len(in_shape) == 2 and len(out_shape) == 2:
        return TokenCandidate(spec, in_shape, out_shape, relu_out, pool)
    if len(in_shape) == 3 and len(out_shape) == 3:
        return Candidate(spec, in_shape, out_shape, relu_out, pool)
    raise RaykdError(f"candidate {spec}: the neighbourhood goes from {tuple(in_shape)} to "
                     f"{tuple(out_shape)} per image; candidates need feature maps (C, H, W) or "
                     "tokens (L, C) at both ends: choose other groups")


def block_shapes(model: StagedModel, input_shape) -> list[tuple[tuple, tuple]]:
    """(input shape, output shape) of every block."""
    outs = tap_shapes(model, model.block_names, input_shape)
    shapes, entering = [], tuple(input_shape)
    for name in model.block_names:
        shapes.append((entering, outs[name]))
        entering = outs[name]
    return shapes


def pools(model: StagedModel, start: int, stop: int) -> bool:
    """Whether the teacher's blocks [start, stop) downsample with a max-pool."""
    return any(isinstance(m, nn.MaxPool2d) for name in model.block_names[start:stop]
               for m in model.blocks[name].modules())


def neighbourhoods(model: StagedModel, groups: list[str]) -> list[tuple[str, int, int]]:
    """(name, start, stop) block ranges. A group is a stage name (its blocks since the previous
    stage ended) or a block name; [] means one neighbourhood per stage. The stem and the
    classifier always stay the teacher's."""
    names = model.block_names
    ends = {s: names.index(b) for s, b in model.stages.items()}
    stage_order = list(model.stages)
    if not groups:
        groups = stage_order
    out = []
    for g in groups:
        if g in ends:
            i = stage_order.index(g)
            start = ends[stage_order[i - 1]] + 1 if i > 0 else 1
            out.append((g, start, ends[g] + 1))
        elif g in names and 0 < names.index(g) < len(names) - 1:
            out.append((g, names.index(g), names.index(g) + 1))
        else:
            raise RaykdError(f"unknown neighbourhood {g!r}; give stages ({', '.join(stage_order)}) "
                             f"or inner block names ({', '.join(names[1:-1])})")
    ranges = sorted((s, e) for _, s, e in out)
    if any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        raise RaykdError("neighbourhoods overlap; give disjoint stages or blocks")
    return out


def candidate_neighbourhoods(model: StagedModel, groups: list[str], input_shape,
                            candidates: list[str]) -> list[tuple[str, int, int]]:
    """`neighbourhoods`, checked against the candidates: each must fit between a neighbourhood's
    ends (feature maps or tokens at both). With the default groups (one per stage) a stage that
    no candidate fits (a ViT's first, from the patch embedding's maps to tokens) stays the
    teacher's, and the log says so; groups the job names must all fit (one line otherwise)."""
    from raykd.log import log

    shapes = block_shapes(model, input_shape)
    kept = []
    for name, start, stop in neighbourhoods(model, groups):
        try:
            for spec in candidates:
                make_candidate(spec, shapes[start][0], shapes[stop - 1][1])
        except RaykdError as e:
            if groups:
                raise RaykdError(f"neighbourhood {name}: {e}") from None
            log.info("neighbourhood %s stays the teacher's: %s", name, e)
            continue
        kept.append((name, start, stop))
    if not kept:
        raise RaykdError("no neighbourhood of the teacher fits the candidates "
                         f"{', '.join(candidates)}; give groups whose ends are feature maps or "
                         "tokens")
    return kept


def boundary_taps(model: StagedModel, boundaries) -> list[str]:
    """The teacher's taps at a partition's block boundaries (the output of the block before each)
    and its logits: one teacher-cache entry per split holds them for all of the partition's parts
    and candidates, each reading its own two ends."""
    return sorted({model.block_names[i - 1] for i in boundaries} | {LOGITS})


def stitch(teacher: StagedModel, parts: list[tuple[int, int, nn.Module]]) -> StagedModel:
    """The teacher's blocks with each (start, stop) range replaced by its module."""
    replaced = {start: (stop, module) for start, stop, module in parts}
    blocks: "OrderedDict[str, nn.Module]" = OrderedDict()
    names = teacher.block_names
    i, stages = 0, {}
    while i < len(names):
        if i in replaced:
            stop, module = replaced[i]
            key = f"nb_{names[i]}"
            blocks[key] = module
            for s, b in teacher.stages.items():
                if i <= names.index(b) < stop:
                    stages[s] = key
            i = stop
        else:
            blocks[names[i]] = teacher.blocks[names[i]]
            for s, b in teacher.stages.items():
                if b == names[i]:
                    stages[s] = names[i]
            i += 1
    model = StagedModel(blocks, stages)
    model.arch = "stitched"
    return model
