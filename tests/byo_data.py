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


class Augmented(torch.utils.data.Dataset):
    """Digits with the CIFAR recipe shrunk to 8x8: pad 1, random crop, horizontal flip, drawn
    from torch's random stream as torchvision's transforms do."""

    def __init__(self, x, y):
        from torchvision import transforms as T

        self.x, self.y = x, y
        self.transform = T.Compose([T.RandomCrop(8, padding=1), T.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.x[i]), int(self.y[i])


def augmented_digits(test: int = 300, val: int = 200):
    """scikit-learn's digits, the training split augmented (so not deterministic)."""
    x, y = _digits(8)
    train = slice(test + val, None)
    return {"train": Augmented(x[train], y[train]),
            "val": TensorDataset(x[test:test + val], y[test:test + val]),
            "test": TensorDataset(x[:test], y[:test]), "num_classes": 10, "deterministic": False}


TEST_READS = []    # indices of the test split read in this process (counted_digits)


class Counted(torch.utils.data.Dataset):
    def __init__(self, inner, reads: list):
        self.inner, self.reads = inner, reads

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.inner[i]


def counted_digits(test: int = 300):
    """digit_splits whose test split records every read in TEST_READS."""
    splits = digit_splits(test=test)
    splits["test"] = Counted(splits["test"], TEST_READS)
    return splits


class Unreadable(torch.utils.data.Dataset):
    """A split of the right length whose every read fails: proves a run never reads it."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        raise RuntimeError(f"training image {i} was read")


def digits_without_training_reads(test: int = 300, val: int = 200):
    """scikit-learn's digits with a training split that fails on any read (data-free runs)."""
    x, y = _digits(8)
    train = slice(test + val, None)
    return {"train": Unreadable(TensorDataset(x[train], y[train])),
            "val": TensorDataset(x[test:test + val], y[test:test + val]),
            "test": TensorDataset(x[:test], y[:test]), "num_classes": 10, "deterministic": True}
