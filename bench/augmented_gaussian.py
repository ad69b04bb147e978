"""A data factory for bench/gpu.py's replay row: CIFAR-shaped Gaussian class clusters whose
training split is augmented with the CIFAR recipe (pad 4, random crop, horizontal flip), so KD
needs either the online teacher or replayed views. Named in a data spec as
`augmented_gaussian:splits` (bench/ on the path)."""
import torch
from torch.utils.data import Dataset, TensorDataset


class Cropped(Dataset):
    def __init__(self, x, y):
        from torchvision import transforms as T

        self.x, self.y = x, y
        size = x.shape[-1]
        self.transform = T.Compose([T.RandomCrop(size, padding=size // 8),
                                    T.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.x[i]), int(self.y[i])


def splits(size: int = 32, samples: int = 2048, held_out: int = 256, classes: int = 10):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(classes, 3, size, size, generator=g)
    y = torch.randint(0, classes, (samples + 2 * held_out,), generator=g)
    x = means[y] + torch.randn(len(y), 3, size, size, generator=g)
    val, test = slice(0, held_out), slice(held_out, 2 * held_out)
    train = slice(2 * held_out, None)
    return {"train": Cropped(x[train], y[train]), "val": TensorDataset(x[val], y[val]),
            "test": TensorDataset(x[test], y[test]), "num_classes": classes,
            "deterministic": False}
