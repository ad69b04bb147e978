"""What every training loop feeds on: indexed batches, teacher outputs requested one batch
ahead, and top-1 evaluation (sharded across data-parallel workers)."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from raykd.models.staged import mode


class WithIndex(torch.utils.data.Dataset):
    """Yields (x, y, index) so a cached teacher can look its outputs up."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


class SeededSamples(torch.utils.data.Dataset):
    """An augmented training split whose random transforms draw, for each image, from a
    generator seeded by (seed, epoch, image index) alone, never from the process-global stream:
    so a run resumed at epoch e draws what it drew the first time, units that share a seed (DIH
    heads trained together or one run each) see the same views, data-parallel ranks and loader
    workers draw each image's view once and independently, whatever the order or sharding."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.draw(i, self.epoch)

    def draw(self, i, stream: int):
        """Image i as its random transforms make it from generator stream `stream` (an epoch, or
        a stored view's number: raykd.teacher.replay). torch's, Python's and NumPy's global
        generators are all seeded (torchvision's RandomOrder and RandomChoice draw from
        Python's, other libraries' transforms from NumPy's); torch's and Python's are left as
        they were. NumPy's is left seeded by the last image: saving and restoring its state
        costs 100 us an image, a quarter of reading and cropping a small PNG, and nothing in
        raykd draws from it."""
        seed = ((self.seed * 1_000_003 + stream) * 1_000_033 + int(i)) % (1 << 63)
        python = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % (1 << 32))
                return self.dataset[i]
        finally:
            random.setstate(python)


def training_samples(splits, seed: int):
    """The training split as a unit iterates it: seeded per image where it is augmented."""
    return splits.train if splits.deterministic else SeededSamples(splits.train, seed)


def loader_options(data, device) -> dict:
    """What every training loader shares: `data.loader_workers` worker processes (each image's
    random view is seeded per image, SeededSamples, so workers change nothing), pinned memory
    for non-blocking copies to a GPU."""
    return {"num_workers": data.loader_workers, "pin_memory": device.type == "cuda"}


def at_epoch(samples, epoch: int):
    if isinstance(samples, SeededSamples):
        samples.set_epoch(epoch)
    return samples


def with_teacher(loader, teachers, taps, device):
    """Yield (x, y, pending outputs of each teacher, the images' dataset indices), asking for
    batch i+1 before batch i is trained on, so teachers served by actors work while the student
    steps."""
    previous = None
    for x, y, index in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        pending = [t.submit(x, taps, index) for t in teachers] if taps else []
        if previous is not None:
            yield previous
        previous = (x, y, pending, index)
    if previous is not None:
        yield previous


def epoch_order(seed: int, epoch: int) -> torch.Generator:
    """The shuffling generator of one epoch: the same order on a resumed run."""
    return torch.Generator().manual_seed(seed * 10_007 + epoch)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int, device, rank: int = 0,
             world: int = 1) -> float:
    """Top-1 accuracy; with several workers each scores a disjoint shard and counts are summed."""
    shard = Subset(dataset, list(range(rank, len(dataset), world))) if world > 1 else dataset
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    with mode(model, False):
        for x, y in DataLoader(shard, batch_size=batch_size):
            x, y = x.to(device), y.to(device)
            correct[0] += (model(x).argmax(1) == y).sum()
            correct[1] += len(y)
    if world > 1:
        dist.all_reduce(correct)
    return float(correct[0] / correct[1].clamp_min(1))
