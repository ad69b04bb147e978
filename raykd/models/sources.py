"""Models by source: `torchvision:NAME` (any torchvision classification builder), `timm:NAME`
(any timm model) and `package.module:function` (a factory of your own, called with
`num_classes`, `in_channels` when it takes it, and `model_args`), built with random weights
(nothing is downloaded) and cut into a staged model (raykd.models.graph) so that every method,
the teacher service and the exports address them by tap name like the zoo's own.

    build_source_model("timm:resnet18", num_classes=10, in_channels=3, image_size=64,
                       args={"drop_path_rate": 0.05})

Stages: timm's `feature_info` modules where the model has them (as timm's own feature
extraction uses), else the last block at each feature-map resolution.
"""
from __future__ import annotations

import difflib
import inspect

from torch import nn

from raykd.errors import RaykdError, one_line
from raykd.job.factories import check_allowed, code_fingerprint, is_factory, load
from raykd.job.specs import image_hw
from raykd.models.staged import StagedModel

SOURCES = ("torchvision", "timm")


def split_source(name: str) -> tuple[str, str]:
    """("torchvision" | "timm", model name), ("factory", "package.module:function") or ("zoo",
    name)."""
    if ":" not in name:
        return "zoo", name
    prefix, arch = name.split(":", 1)
    if prefix in SOURCES:
        return prefix, arch
    if is_factory(name):
        return "factory", name
    raise RaykdError(f"unknown model source in {name!r}; allowed: "
                     f"{', '.join(s + ':NAME' for s in SOURCES)}, package.module:function (a "
                     "factory of your own) or a zoo model name")


def fingerprint(name: str) -> str | None:
    """What, besides the name and arguments, decides a sourced model's architecture: its
    package's version (None for the zoo, which is raykd's own code)."""
    source, _ = split_source(name)
    if source == "zoo":
        return None
    if source == "factory":   # your own code: its file's content
        return code_fingerprint(name)
    from importlib.metadata import version

    return f"{source} {version(source)}"


def _close(word: str, names: list[str]) -> str:
    near = difflib.get_close_matches(word, names, n=4, cutoff=0.6)
    return f"; close: {', '.join(near)}" if near else ""


def check_source(name: str) -> None:
    """One line for an unknown torchvision or timm model (with close matches)."""
    source, arch = split_source(name)
    if source == "factory":
        check_allowed(name, "model")
        return
    if source == "torchvision":
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if arch not in names:
            raise RaykdError(f"unknown torchvision classification model {arch!r}"
                             + _close(arch, names))
    elif source == "timm":
        timm = _timm(name)
        if not timm.is_model(arch):
            raise RaykdError(f"unknown timm model {arch!r}" + _close(arch, timm.list_models()))


def _timm(name: str):
    try:
        import timm
    except ImportError:
        raise RaykdError(f"model {name}: timm is not installed (pip install timm)") from None
    return timm


def build_source_model(name: str, num_classes: int, in_channels: int, image_size,
                       args: dict | None = None, stages: list[str] | None = None) -> StagedModel:
    """`stages`: module paths to call stage1..N (default: timm's feature_info, else one per
    feature-map resolution)."""
    from raykd.models.graph import cut_module

    check_source(name)
    source, arch = split_source(name)
    args = dict(args or {})
    try:
        if source == "torchvision":
            module, derived = _torchvision(arch, num_classes, in_channels, args), None
        elif source == "factory":
            module, derived = _factory(name, num_classes, in_channels, args), None
        else:
            module, derived = _timm_model(name, arch, num_classes, in_channels, image_size, args)
    except RaykdError:
        raise
    except Exception as e:   # a bad keyword argument, an impossible configuration
        raise RaykdError(f"model {name} with model_args {args}: {one_line(e, typed=True)}") \
            from None
    if not isinstance(module, nn.Module):
        raise RaykdError(f"model {name}: its builder returned {type(module).__name__}, not a "
                         "torch.nn.Module")
    staged = cut_module(module, (in_channels, *image_hw(image_size)), name, stages or derived)
    staged.arch, staged.model_args, staged.stage_paths = name, args, list(stages or [])
    return staged


def _factory(name: str, num_classes: int, in_channels: int, args: dict) -> nn.Module:
    """Call `package.module:function(num_classes=..., [in_channels=...,] **args)`."""
    build = load(name, "model")
    params = inspect.signature(build).parameters
    kwargs = {"num_classes": num_classes, **args}
    if "in_channels" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs["in_channels"] = in_channels
    return build(**kwargs)


def _torchvision(arch: str, num_classes: int, in_channels: int, args: dict) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **args)
    if in_channels != 3:
        first_conv_takes(model, in_channels)
    return model


def _timm_model(name, arch, num_classes, in_channels, image_size, args):
    timm = _timm(name)
    cfg = timm.get_pretrained_cfg(arch)
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        # a ViT's position embedding is sized by it (timm takes pixels or (height, width))
        args.setdefault("img_size", image_size if isinstance(image_size, int)
                        else tuple(image_hw(image_size)))
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes,
                              in_chans=in_channels, **args)
    info = getattr(model, "feature_info", None)
    stages = [f["module"] for f in info] if info else None
    return model, stages


def first_conv_takes(model: nn.Module, in_channels: int) -> None:
    """torchvision's builders take no channel count: the first convolution is rebuilt to read
    `in_channels` (grey images), everything else unchanged."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                params = inspect.signature(nn.Conv2d).parameters
                kept = {k: getattr(child, k) for k in ("out_channels", "kernel_size", "stride",
                                                       "padding", "dilation", "groups")
                        if k in params}
                setattr(parent, child_name, nn.Conv2d(in_channels, bias=child.bias is not None,
                                                      **kept))
                return
