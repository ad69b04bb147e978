"""BatchNorm statistics recomputed on a model's own activations.

Each part of a stitched student was distilled on the teacher's activations, so its BatchNorm
running statistics describe the teacher's boundary, not the activations that the part before it
now produces. The mismatch compounds through the stack: a stitched student can score far below
what each of its parts scores when swapped into the teacher alone (bench/neighbourhood.py
measures both). One no-gradient pass over training images, in train mode, replaces every
BatchNorm's running mean and variance with their averages over that pass; no weight changes.
One-shot architecture search does the same for each sub-network before scoring it (Guo et al.
2020, "Single Path One-Shot Neural Architecture Search with Uniform Sampling").
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from raykd.models.staged import mode


def recalibrate_batchnorm(model: nn.Module, images: Dataset, batch_size: int,
                          max_images: int, device="cpu") -> int:
    """Recompute the running statistics of every BatchNorm in `model` from its forward passes on
    the first `max_images` items of `images` (items are (x, ...) tuples), in order. Returns the
    number of images used; 0 (nothing changed) when the model has no BatchNorm or
    `max_images` is 0. The model's train/eval mode and each layer's momentum are restored."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or max_images <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None            # a cumulative average over the pass's batches
    seen = 0
    try:
        batches = DataLoader(images, batch_size=min(batch_size, max_images))
        with mode(model, True), torch.no_grad():
            for x, *_ in batches:
                x = x[:max_images - seen]
                model(x.to(device))
                seen += len(x)
                if seen >= max_images:
                    break
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    return seen
