"""CIFAR ResNets (He et al. 2016, the 6n+2 family) and Wide ResNets, as staged models.

Widths follow RepDistiller: resnet{8..110} use 16/16/32/64 channels, the "x4" variants 32/64/128/256.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ClassifierHead(nn.Module):
    """Global average pool, flatten, linear: the block that produces logits."""

    def __init__(self, channels: int, num_classes: int, pre: nn.Module | None = None):
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.pre(x)).flatten(1))


def cifar_resnet_blocks(depth: int, widths: tuple[int, int, int, int], num_classes: int,
                        in_channels: int):
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    blocks: "OrderedDict[str, nn.Module]" = OrderedDict()
    blocks["stem"] = nn.Sequential(
        _conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
    )
    stages = {}
    cin = widths[0]
    for s, cout in enumerate(widths[1:], start=1):
        for b in range(n):
            stride = 2 if (b == 0 and s > 1) else 1
            blocks[f"layer{s}_{b}"] = BasicBlock(cin, cout, stride)
            cin = cout
        stages[f"stage{s}"] = f"layer{s}_{n - 1}"
    blocks["head"] = ClassifierHead(cin, num_classes)
    return blocks, stages


class WideBasicBlock(nn.Module):
    """Pre-activation block of Zagoruyko & Komodakis (2016)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        o = self.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


def wrn_blocks(depth: int, width: int, num_classes: int, in_channels: int):
    if (depth - 4) % 6 != 0:
        raise ValueError(f"WRN depth must be 6n+4, got {depth}")
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    blocks: "OrderedDict[str, nn.Module]" = OrderedDict()
    blocks["stem"] = _conv3x3(in_channels, widths[0])
    stages = {}
    cin = widths[0]
    for s, cout in enumerate(widths[1:], start=1):
        for b in range(n):
            stride = 2 if (b == 0 and s > 1) else 1
            blocks[f"layer{s}_{b}"] = WideBasicBlock(cin, cout, stride)
            cin = cout
        stages[f"stage{s}"] = f"layer{s}_{n - 1}"
    pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
    blocks["head"] = ClassifierHead(cin, num_classes, pre=pre)
    return blocks, stages
