"""Every trained artefact on disk, in one place: one torch file each, written atomically and
read back with `weights_only=True` (a file can hold tensors and plain values, never code).

Kinds (the payload's `kind`):
  model      a staged model: architecture name, shape facts, weights; a stitched student also
             names its teacher export and candidate exports (`stitch`)
  heads      DIH classifier heads on a teacher's stages
  candidate  one distilled neighbourhood replacement (Neighbourhood Distillation)
Exports hold only a model's own weights: a method's connectors or transformations are never
exported.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from raykd.errors import RaykdError
from raykd.files import torch_load, torch_save
from raykd.models import StagedModel, build_model
from raykd.models.heads import StageHead
from raykd.models.stitch import make_candidate, stitch

KINDS = ("model", "heads", "candidate")


def _weights(module: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def read_export(path: str | Path, kind: str) -> dict:
    """The payload of a raykd export of the given kind; a one-line error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise RaykdError(f"model export not found: {path}")
    payload = torch_load(path)
    found = payload.get("kind") if isinstance(payload, dict) else None
    if found != kind:
        raise RaykdError(f"{path}: not a raykd {kind} export"
                         + (f" (it holds a {found})" if found in KINDS else ""))
    return payload


# ---- staged models (teachers, students, stitched students) ---------------------------------

def model_payload(model: StagedModel, num_classes: int, in_channels: int,
                  image_size: int, mean: list | None = None, std: list | None = None) -> dict:
    """What a model export holds (plain values and CPU tensors: it can cross processes).
    `mean`/`std`: the normalisation of the images it was trained on, where the job set it (a
    job distilling from the export as its `teacher.checkpoint` normalises the same way)."""
    return {"kind": "model", "arch": model.arch, "num_classes": num_classes,
            "mean": list(mean or []), "std": list(std or []),
            "model_args": dict(getattr(model, "model_args", None) or {}),
            "stage_paths": list(getattr(model, "stage_paths", None) or []),
            "in_channels": in_channels, "image_size": image_size, "state_dict": _weights(model),
            # a stitched student: the teacher export it came from and its candidates
            "stitch": getattr(model, "stitch_info", None)}


def save_export(model: StagedModel, path: str | Path, num_classes: int, in_channels: int,
                image_size: int, mean: list | None = None, std: list | None = None) -> None:
    torch_save(model_payload(model, num_classes, in_channels, image_size, mean, std), path)


def load_export(path: str | Path, map_location="cpu") -> StagedModel:
    payload = read_export(path, "model")
    if payload.get("stitch"):
        model = build_stitched(payload["stitch"])
    else:
        model = build_model(payload["arch"], payload["num_classes"], payload["in_channels"],
                            payload["image_size"], payload.get("model_args"),
                            payload.get("stage_paths"))
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location)


def model_name(model: StagedModel) -> str:
    """What a results row calls a model: its zoo name, or for a stitched one its parts
    ("stitched:w0.5d1+w0.5d1")."""
    parts = (getattr(model, "stitch_info", None) or {}).get("parts", [])
    if parts:
        return "stitched:" + "+".join(candidate_spec(p) for _a, _b, p in parts)
    return getattr(model, "arch", "?")


def build_stitched(info: dict) -> StagedModel:
    """info = {"teacher": export path, "parts": [[start, stop, candidate export path], ...]}:
    the teacher's blocks with each range replaced by its trained candidate."""
    teacher = load_export(info["teacher"])
    model = stitch(teacher, [(int(a), int(b), load_candidate(p)) for a, b, p in info["parts"]])
    model.stitch_info = info
    return model


# ---- DIH heads --------------------------------------------------------------------------

def save_heads(heads: nn.ModuleDict, path: str | Path, num_classes: int) -> None:
    torch_save({"kind": "heads", "num_classes": num_classes, "heads": {
        s: {"in_shape": list(h.in_shape), "pooled": h.pooled, "state_dict": _weights(h)}
        for s, h in heads.items()}}, path)


def load_heads(paths: list[str]) -> nn.ModuleDict:
    heads = nn.ModuleDict()
    for path in paths:
        payload = read_export(path, "heads")
        for stage, h in payload["heads"].items():
            head = StageHead(tuple(h["in_shape"]), payload["num_classes"], h["pooled"])
            head.load_state_dict(h["state_dict"])
            heads[stage] = head
    return heads


# ---- neighbourhood candidates -------------------------------------------------------------

def save_candidate(module: nn.Module, path: str | Path) -> None:
    torch_save({"kind": "candidate", "spec": module.spec, "in_shape": list(module.in_shape),
                "out_shape": list(module.out_shape), "relu_out": module.relu_out,
                "pool": module.pool, "state_dict": _weights(module)}, path)


def candidate_spec(path: str | Path) -> str:
    return read_export(path, "candidate")["spec"]


def load_candidate(path: str | Path) -> nn.Module:
    payload = read_export(path, "candidate")
    module = make_candidate(payload["spec"], tuple(payload["in_shape"]),
                            tuple(payload["out_shape"]), payload.get("relu_out", True),
                            payload.get("pool", False))
    module.load_state_dict(payload["state_dict"])
    return module
