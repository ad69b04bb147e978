"""Data factories of a user's own, as `data.dataset: byo_data:digit_splits` names them (the
tests' folder is on the path): plain torch datasets, no raykd in sight."""
import torch
from torch.utils.data import TensorDataset


def _digits(size: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear")
    return (x - 0.3) / 0.4, torch.as_tensor(d.target)


def digit_splits(size: int = 8, test: int = 300):
    """scikit-learn's digits: train and test, no val (raykd carves it from train)."""
    x, y = _digits(size)
    return {"train": TensorDataset(x[test:], y[test:]), "test": TensorDataset(x[:test], y[:test]),
            "num_classes": 10, "deterministic": True}


def unsaid():
    """Leaves out whether its training inputs are random."""
    x, y = _digits(8)
    return {"train": TensorDataset(x, y), "test": TensorDataset(x, y), "num_classes": 10}


def augmented_without_val():
    x, y = _digits(8)
    return {"train": TensorDataset(x, y), "test": TensorDataset(x, y), "num_classes": 10,
            "deterministic": False}


def broken():
    raise OSError("the bucket is not mounted")
