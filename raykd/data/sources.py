"""Datasets by source, as torchdistill names them, besides raykd's own:

    dataset: torchvision:FashionMNIST     any torchvision.datasets class, read from data.root with
                                          download=False (raykd never downloads), data.args
                                          passed to it
    dataset: my_data:splits               a function of your own, called with data.args

A torchvision class is asked for its training split (`train=True` or `split="train"`) and its
test split (`train=False` / `split="test"`) where it has one, else the test split is carved from
the training images like the validation split (`val_size`, `test_size`, `split_seed`, as for the
built-in datasets). Images are resized to `data.image_size` (default: their own size), kept grey
or colour as the first one is, normalised by `data.mean`/`data.std` (ImageNet's for colour, 0.5
for grey), and the training split augmented as `data.augment` says (`none` by default here).

A data factory returns a dict (or an object with these attributes): `train` and `test` datasets
of (image tensor C x H x W, class index), optionally `val` (else carved from train), `num_classes`
and `deterministic`: whether the same training index always gives the same input. raykd computes
the teacher's outputs on the training split once when it is, so the factory must say: leaving it
out is a one-line error.
"""
from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Mapping

from raykd.data.augment import preset, train_transforms
from raykd.data.normalise import normalisation
from raykd.data.registry import DatasetSplits, split_indices, subset
from raykd.errors import RaykdError, one_line
from raykd.job import factories
from raykd.job.specs import image_hw

TORCHVISION = "torchvision:"


def is_sourced(name: str) -> bool:
    return name.startswith(TORCHVISION) or factories.is_factory(name)


def check_source(name: str) -> None:
    """One line for an unknown torchvision dataset class (with close matches) or a factory the
    job does not name."""
    if name.startswith(TORCHVISION):
        _torchvision_class(name)
    elif factories.is_factory(name):
        factories.check_allowed(name, "data.dataset")
    else:
        raise RaykdError(f"unknown dataset source in {name!r}; allowed: torchvision:CLASS or "
                         "package.module:function")


def fingerprint(name: str) -> str:
    """What decides a sourced dataset's contents besides its settings: the factory's code, or
    torchvision's version."""
    if factories.is_factory(name):
        return factories.code_fingerprint(name)
    from importlib.metadata import version

    return f"torchvision {version('torchvision')}"


def load_sourced(spec) -> DatasetSplits:
    if factories.is_factory(spec.dataset):
        return _from_factory(spec)
    return _from_torchvision(spec)


# ---- torchvision dataset classes ----------------------------------------------------------

def _torchvision_class(name: str):
    import torchvision.datasets as datasets

    cls_name = name[len(TORCHVISION):]
    cls = getattr(datasets, cls_name, None)
    if not (inspect.isclass(cls) and cls_name in datasets.__all__):
        near = difflib.get_close_matches(cls_name, datasets.__all__, n=4, cutoff=0.6)
        raise RaykdError(f"unknown torchvision dataset class {cls_name!r}"
                         + (f"; close: {', '.join(near)}" if near else
                            "; see torchvision.datasets.__all__"))
    return cls


class ToMode:
    """PIL image -> the dataset's mode (grey "L" or "RGB"), so every item has one shape."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode) if getattr(image, "mode", self.mode) != self.mode else image


def _split_kwargs(cls, split: str, args: dict) -> dict | None:
    """How `cls` is asked for `split` ("train"/"test"); None if it cannot be. A class that
    passes its keyword arguments on (EMNIST: `split` is its subset, `train` goes to MNIST) is
    asked by `train`."""
    params = inspect.signature(cls.__init__).parameters
    if "train" in params:
        return {"train": split == "train"}
    if "split" in params and "split" not in args:
        return {"split": split}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return {"train": split == "train"}
    return {} if split == "train" else None


def _open(cls, spec, root: str, split: str, transform):
    kwargs = _split_kwargs(cls, split, spec.args)
    if kwargs is None:
        return None
    if "download" in inspect.signature(cls.__init__).parameters:
        kwargs["download"] = False
    try:
        return cls(root, transform=transform, **kwargs, **spec.args)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise RaykdError(
            f"data: {spec.dataset} found nothing usable under {root} ({one_line(e)}); raykd never "
            f"downloads: fetch it where there is internet ({cls.__name__}(ROOT, download=True)) "
            "and copy ROOT to data.root") from None
    except TypeError as e:
        raise RaykdError(f"data: {spec.dataset} with data.args {spec.args}: "
                         f"{one_line(e, typed=True)}") from None
    except ValueError as e:   # e.g. a split the class does not have
        if split == "test":
            return None
        raise RaykdError(f"data: {spec.dataset}: {one_line(e)}") from None


def _class_count(dataset, name: str) -> int:
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    for attr in ("targets", "labels", "_labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None and len(labels):
            return int(max(int(v) for v in labels)) + 1
    raise RaykdError(f"data: {name} lists no classes (no .classes, .targets or .labels); wrap it "
                     "in a data factory of your own that returns num_classes")


def _from_torchvision(spec) -> DatasetSplits:
    from torchvision import transforms as T

    cls = _torchvision_class(spec.dataset)
    root = os.path.abspath(os.path.expanduser(spec.root or os.environ.get("RAYKD_DATA", "data")))
    raw = _open(cls, spec, root, "train", None)
    image, label = raw[0]
    if not hasattr(image, "convert") or not isinstance(label, int):
        raise RaykdError(f"data: {spec.dataset} yields ({type(image).__name__}, "
                         f"{type(label).__name__}) items, not (image, class index): wrap it in a "
                         "data factory of your own")
    mode = "L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    channels = 1 if mode == "L" else 3
    width, height = image.size
    size = image_hw(spec.image_size) if spec.image_size else (height, width)
    mean, std = normalisation(spec, channels, spec.dataset)
    resize = [T.Resize(size)] if (height, width) != size else []
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    augment = preset(spec.augment, "none")
    plain = T.Compose([ToMode(mode), *resize, *norm])
    train_aug = _open(cls, spec, root, "train", T.Compose(
        [ToMode(mode), *train_transforms(augment, size, resize), *norm]))
    train_plain = _open(cls, spec, root, "train", plain)
    test = _open(cls, spec, root, "test", plain)
    n = len(train_plain)
    val_size = spec.val_size or max(1, n // 10)
    test_size = 0 if test is not None else (spec.test_size or max(1, n // 10))
    tr, va, te = split_indices(n, val_size, test_size, spec.train_size, spec.split_seed,
                               f"{spec.dataset} under {root}")
    if test is None:
        test = subset(train_plain, te)
    elif spec.test_size is not None:
        test = subset(test, list(range(min(spec.test_size, len(test)))))
    return DatasetSplits(train=subset(train_aug, tr), val=subset(train_plain, va), test=test,
                         num_classes=_class_count(raw, spec.dataset),
                         input_shape=(channels, *size), deterministic=augment == "none")


# ---- data factories of your own -------------------------------------------------------------

def _part(made, key: str):
    return made.get(key) if isinstance(made, Mapping) else getattr(made, key, None)


def _has(made, key: str) -> bool:
    return key in made if isinstance(made, Mapping) else hasattr(made, key)


def _from_factory(spec) -> DatasetSplits:
    name = spec.dataset
    build = factories.load(name, "data.dataset")
    try:
        made = build(**spec.args)
    except Exception as e:
        raise RaykdError(f"data.dataset {name} with data.args {spec.args} failed: "
                         f"{one_line(e, typed=True)}") from None
    missing = [k for k in ("train", "test", "num_classes") if _part(made, k) is None]
    if missing:
        raise RaykdError(f"data.dataset {name} returned no {', '.join(missing)}; a data factory "
                         "returns train, test (and optionally val) datasets, num_classes and "
                         "deterministic")
    if not _has(made, "deterministic") or not isinstance(_part(made, "deterministic"), bool):
        raise RaykdError(f"data.dataset {name}: say whether the training inputs are random: "
                         "return deterministic=True (the same index always gives the same "
                         "image) or False (augmented); raykd caches the teacher's outputs when "
                         "it is True")
    deterministic = _part(made, "deterministic")
    train, val, test = _part(made, "train"), _part(made, "val"), _part(made, "test")
    # the item format from the val split where there is one (a data-free job never reads a
    # training image), else from train; never from test, which is read for reporting only
    probe = next((d for d in (val, train) if d is not None and len(d)), None)
    first = probe[0][0] if probe is not None else None
    if getattr(first, "dim", lambda: 0)() != 3 or first.shape[1] != first.shape[2]:
        raise RaykdError(f"data.dataset {name}: items must be (C x H x W tensor with "
                         f"H == W, class index), got {getattr(first, 'shape', type(first))}")
    val_size = 0 if val is not None else (spec.val_size or max(1, len(train) // 10))
    if val is None and not deterministic:
        raise RaykdError(f"data.dataset {name}: return a val split too; raykd cannot carve one "
                         "from an augmented training split")
    tr, va, _ = split_indices(len(train), val_size, 0, spec.train_size, spec.split_seed, name)
    if spec.test_size is not None:
        test = subset(test, list(range(min(spec.test_size, len(test)))))
    return DatasetSplits(train=subset(train, tr), val=val if val is not None else subset(train, va),
                         test=test, num_classes=int(_part(made, "num_classes")),
                         input_shape=tuple(first.shape), deterministic=deterministic)
