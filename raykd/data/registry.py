from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset, Subset

from raykd.errors import RaykdError
from raykd.job.specs import InputShape

_DATASETS: dict[str, Callable] = {}


@dataclass
class DatasetSplits(InputShape):
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W
    deterministic: bool = True         # the same index always gives the same input (no augmentation)


def register_dataset(name: str):
    def deco(fn):
        _DATASETS[name] = fn
        return fn
    return deco


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def registered() -> dict[str, Callable]:
    """raykd's own datasets by name (those registered with `register_dataset`)."""
    return _DATASETS


def split_indices(n: int, val_size: int, test_size: int, train_size: int | None, seed: int,
                  name: str) -> tuple[list[int], list[int], list[int]]:
    """A seeded permutation cut into test, val and train (train optionally limited)."""
    if val_size + test_size >= n:
        raise RaykdError(
            f"data: val_size ({val_size}) + test_size ({test_size}) leave no training images "
            f"out of the {n} in {name}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    test = perm[:test_size]
    val = perm[test_size:test_size + val_size]
    train = perm[test_size + val_size:]
    return _limit(train, train_size, name), val, test


def _limit(indices: list[int], train_size: int | None, name: str) -> list[int]:
    if train_size is None:
        return indices
    if train_size > len(indices):
        raise RaykdError(f"data.train_size={train_size} but {name} has only {len(indices)} "
                         "training images after the val/test split")
    return indices[:train_size]


def subset(ds: Dataset, idx: list[int]) -> Subset:
    return Subset(ds, idx)
