"""The model zoo. Every model is a `StagedModel` built by name.

    build_model("resnet8", num_classes=100, in_channels=3, image_size=32)

Names: the CIFAR ResNets resnet8..resnet110, resnet8x4, resnet32x4; Wide ResNets wrn_D_W
(e.g. wrn_40_2); small CNNs cnn_small, cnn, cnn_wide (any input size, meant for 1x28x28 and 1x8x8);
torchvision resnet18, resnet34 (ImageNet stem); resnet50_cifar, resnet152_cifar (3x3 stem, no max pool).
Beyond the zoo: `torchvision:NAME` and `timm:NAME` (raykd.models.sources).
"""
from __future__ import annotations

import re
from typing import Callable

from raykd.errors import RaykdError
from raykd.models.cifar_resnet import cifar_resnet_blocks, wrn_blocks
from raykd.models.small_cnn import small_cnn_blocks
from raykd.models.sources import build_source_model, check_source
from raykd.models.staged import LOGITS, StagedModel, count_macs, count_params
from raykd.models.torchvision_resnet import torchvision_resnet_blocks

__all__ = ["LOGITS", "StagedModel", "build_model", "count_macs", "count_params", "model_names"]

_STANDARD = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

# name -> factory(num_classes, in_channels, image_size) -> (blocks, stages)
_FACTORIES: dict[str, Callable] = {}
for _depth in (8, 14, 20, 32, 44, 56, 110):
    _FACTORIES[f"resnet{_depth}"] = (
        lambda nc, ic, sz, d=_depth: cifar_resnet_blocks(d, _STANDARD, nc, ic))
_FACTORIES["resnet8x4"] = lambda nc, ic, sz: cifar_resnet_blocks(8, _X4, nc, ic)
_FACTORIES["resnet32x4"] = lambda nc, ic, sz: cifar_resnet_blocks(32, _X4, nc, ic)
_FACTORIES["cnn_small"] = lambda nc, ic, sz: small_cnn_blocks((8, 8, 16, 32), nc, ic, sz)
_FACTORIES["cnn"] = lambda nc, ic, sz: small_cnn_blocks((16, 16, 32, 64), nc, ic, sz)
_FACTORIES["cnn_wide"] = lambda nc, ic, sz: small_cnn_blocks((32, 64, 128, 256), nc, ic, sz)
for _arch in ("resnet18", "resnet34"):
    _FACTORIES[_arch] = (
        lambda nc, ic, sz, a=_arch: torchvision_resnet_blocks(a, nc, ic, cifar_stem=False))
for _arch in ("resnet50", "resnet152"):
    _FACTORIES[f"{_arch}_cifar"] = (
        lambda nc, ic, sz, a=_arch: torchvision_resnet_blocks(a, nc, ic, cifar_stem=True))

_WRN = re.compile(r"^wrn_(\d+)_(\d+)$")


def model_names() -> list[str]:
    return sorted(_FACTORIES) + ["wrn_D_W (D = 6n+4, e.g. wrn_16_2, wrn_40_2)",
                                 "torchvision:NAME", "timm:NAME"]


def check_model_name(name: str) -> None:
    if ":" in name:
        check_source(name)
        return
    if name in _FACTORIES:
        return
    m = _WRN.match(name)
    if m and (int(m.group(1)) - 4) % 6 == 0 and int(m.group(1)) >= 10 and int(m.group(2)) >= 1:
        return
    raise RaykdError(f"unknown model {name!r}; allowed: {', '.join(model_names())}")


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size=32,
                args: dict | None = None, stages: list[str] | None = None) -> StagedModel:
    """A zoo model by name, or `torchvision:NAME` / `timm:NAME` with keyword arguments `args`
    and, optionally, its stages by module path (raykd.models.sources). `image_size`: pixels of a
    square input, or (height, width)."""
    if ":" in name:
        return build_source_model(name, num_classes, in_channels, image_size, args, stages)
    check_model_name(name)
    if args or stages:
        raise RaykdError(f"model {name}: model_args and stages are for torchvision: and timm: "
                         "models; the zoo's are fixed")
    m = _WRN.match(name)
    if m:
        blocks, stages = wrn_blocks(int(m.group(1)), int(m.group(2)), num_classes, in_channels)
    else:
        blocks, stages = _FACTORIES[name](num_classes, in_channels, image_size)
    model = StagedModel(blocks, stages)
    model.arch, model.model_args = name, {}
    return model
