"""A trained model on disk: architecture name, shape facts and weights, in one torch file.

Exports are what later stages load (a student's teacher, a stitched model's parts). They hold only
the staged model's own weights: a method's connectors or transformations are never exported.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from raykd.errors import RaykdError
from raykd.models import StagedModel, build_model


def save_export(model: StagedModel, path: str | Path, num_classes: int, in_channels: int,
                image_size: int) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "arch": model.arch, "num_classes": num_classes, "in_channels": in_channels,
        "image_size": image_size,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        # a stitched student: the teacher export it came from and its candidates
        "stitch": getattr(model, "stitch_info", None),
    }
    # write aside, then rename: a reader never sees a half-written file
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_export(path: str | Path, map_location: str | torch.device = "cpu") -> StagedModel:
    path = Path(path)
    if not path.is_file():
        raise RaykdError(f"model export not found: {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("stitch"):
        from raykd.models.stitch import build_stitched
        model = build_stitched(payload["stitch"])
    else:
        model = build_model(payload["arch"], payload["num_classes"], payload["in_channels"],
                            payload["image_size"])
    model.load_state_dict(payload["state_dict"])
    return model


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
