"""A dataset by name, whatever its source: raykd's own (raykd.data.registry), an image folder,
a torchvision class or a factory of your own (raykd.data.sources)."""
from __future__ import annotations

import dataclasses

from raykd.data.registry import DatasetSplits, dataset_names, registered
from raykd.data.sources import check_source, fingerprint, load_sourced
from raykd.errors import RaykdError


def check_dataset_name(name: str) -> None:
    if ":" in name:
        return check_source(name)
    if name not in registered():
        raise RaykdError(f"unknown dataset {name!r}; allowed: {', '.join(dataset_names())}, "
                         "torchvision:CLASS or package.module:function")


def load_dataset(spec) -> DatasetSplits:
    """Build the splits a `DataSpec` describes (raykd.job.specs)."""
    check_dataset_name(spec.dataset)
    if ":" in spec.dataset:
        return load_sourced(spec)
    return registered()[spec.dataset](spec)


def data_identity(spec) -> dict:
    """What decides a dataset's contents (for the keys of stored teachers and cached outputs):
    its settings, and for a torchvision: class or a factory of your own, that code's version."""
    data = dataclasses.asdict(spec)
    if ":" in spec.dataset:
        data["source"] = fingerprint(spec.dataset)
    return data
