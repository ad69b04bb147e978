"""The mean and std that image-file datasets (image folders, torchvision dataset classes) are
normalised by: `data.mean`/`data.std` as given, else those of the teacher's timm pretrained
config (set by raykd.job.config), else ImageNet's for colour and 0.5 for grey.

One value stands for every channel (as timm's `mean: [0.5]`); three values on grey images are
averaged, the grey image being read as R = G = B (as timm adapts a colour model's first
convolution to one channel by summing over its colour weights).
"""
from __future__ import annotations

from raykd.errors import RaykdError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = (0.5,), (0.5,)


def _for_channels(values: tuple[float, ...], channels: int, field: str,
                  what: str) -> tuple[float, ...]:
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if len(values) == 3 and channels == 1:
        return (sum(values) / 3,)
    raise RaykdError(f"data.{field} has {len(values)} values for {what}'s "
                     f"{'grey' if channels == 1 else 'colour'} images; give {channels} (or one "
                     f"for every channel{', or three to average' if channels == 1 else ''})")


def normalisation(spec, channels: int, what: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for `channels`-channel images of dataset `what` under data spec `spec`."""
    mean = tuple(spec.mean) or (IMAGENET_MEAN if channels == 3 else GREY_MEAN)
    std = tuple(spec.std) or (IMAGENET_STD if channels == 3 else GREY_STD)
    if any(s <= 0 for s in std):
        raise RaykdError(f"data.std must be positive, got {list(std)}")
    return _for_channels(mean, channels, "mean", what), _for_channels(std, channels, "std", what)


def timm_normalisation(model: str, weights: str | None) -> tuple[list[float], list[float]] | None:
    """The mean and std of a `timm:NAME` model's pretrained config (of the tag `weights` names,
    when it names one), as timm's own `resolve_data_config` would use; None for other models."""
    if not model.startswith("timm:"):
        return None
    import timm

    from raykd.models.pretrained import is_path

    arch = model.split(":", 1)[1]
    tag = weights if weights and weights != "pretrained" and not is_path(weights) else None
    cfg = timm.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    if cfg is None or not getattr(cfg, "mean", None) or not getattr(cfg, "std", None):
        return None
    return list(cfg.mean), list(cfg.std)
