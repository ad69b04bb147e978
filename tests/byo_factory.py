"""A model factory of a user's own, as `student.model: byo_factory:tiny_net` names it (the
tests' folder is on the path)."""
from torch import nn


def tiny_net(num_classes: int, in_channels: int = 3, width: int = 8) -> nn.Module:
    """Two convolutions and a classifier: a plain nn.Module, no raykd in sight."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def not_a_model(num_classes: int):
    return "a string"
