"""Training-split augmentation presets, `data.augment`, the recipes users already know:

    standard   torchvision's ImageNet reference: RandomResizedCrop(size) + horizontal flip
    cifar      the CIFAR recipe: pad by size/8, random crop back to size + horizontal flip
    none       the evaluation transform (resize) only: deterministic inputs, so the teacher's
               outputs on the training split can be computed once (raykd.teacher.cache)
    auto       the dataset's own: cifar for cifar10/cifar100, standard for imagenet and image
               folders, none for the rest (digits, MNIST-like sets, synthetic data: flips and
               crops change what a digit or a character is)

Validation and test splits never augment.
"""
from __future__ import annotations

from raykd.job.specs import image_hw

PRESETS = ("standard", "cifar", "none")


def preset(augment: str, dataset_default: str) -> str:
    return dataset_default if augment == "auto" else augment


def train_transforms(name: str, size, resize: list) -> list:
    """The training split's geometric transforms for preset `name` at `size` (pixels, or
    (height, width)), where `resize` is the deterministic resize the evaluation splits get."""
    from torchvision import transforms as T

    if name == "standard":
        return [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    if name == "cifar":
        padding = max(1, min(image_hw(size)) // 8)
        return [*resize, T.RandomCrop(size, padding=padding), T.RandomHorizontalFlip()]
    return list(resize)
