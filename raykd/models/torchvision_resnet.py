"""torchvision's ResNets as staged models: ImageNet ResNet-18/34 and CIFAR-stem ResNet-50/152.

Weights are never downloaded (weights=None); a teacher is trained or loaded from a local checkpoint.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from raykd.models.cifar_resnet import ClassifierHead


def torchvision_resnet_blocks(arch: str, num_classes: int, in_channels: int, cifar_stem: bool):
    import torchvision

    tv = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if cifar_stem:
        # Channel Distillation's CIFAR pair: 3x3 stride-1 first conv and no max pooling.
        tv.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        tv.maxpool = nn.Identity()
    elif in_channels != 3:
        tv.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    blocks: "OrderedDict[str, nn.Module]" = OrderedDict()
    blocks["stem"] = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool)
    stages = {}
    for s in range(1, 5):
        layer = getattr(tv, f"layer{s}")
        for b, unit in enumerate(layer):
            blocks[f"layer{s}_{b}"] = unit
        stages[f"stage{s}"] = f"layer{s}_{len(layer) - 1}"
    head = ClassifierHead(tv.fc.in_features, num_classes)
    head.fc = tv.fc
    blocks["head"] = head
    return blocks, stages
