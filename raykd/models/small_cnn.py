"""Small CNNs for MNIST-sized (1x28x28) and digits-sized (1x8x8) inputs.

Three stages of conv-BN-ReLU followed by 2x2 max pooling (skipped once the map is 1x1), then a
pooled linear classifier. Any input size works; widths set the capacity.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from raykd.job.specs import image_hw
from raykd.models.cifar_resnet import ClassifierHead


def _stage(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
              nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def small_cnn_blocks(widths: tuple[int, int, int, int], num_classes: int, in_channels: int,
                     image_size):
    blocks: "OrderedDict[str, nn.Module]" = OrderedDict()
    blocks["stem"] = nn.Sequential(
        nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
    )
    stages = {}
    size, cin = min(image_hw(image_size)), widths[0]
    for s, cout in enumerate(widths[1:], start=1):
        pool = size >= 2
        blocks[f"stage{s}_block"] = _stage(cin, cout, pool)
        size = size // 2 if pool else size
        cin = cout
        stages[f"stage{s}"] = f"stage{s}_block"
    blocks["head"] = ClassifierHead(cin, num_classes)
    return blocks, stages
