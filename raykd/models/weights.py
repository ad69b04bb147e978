"""Starting weights from a file: `teacher.weights` / `student.weights`.

The file (or published weights by name, resolved to their locally cached file by
raykd.models.pretrained) is a plain `state_dict` saved by `torch.save(model.state_dict(), PATH)` (keys of the
original torchvision, timm or zoo module), a dict holding one under `state_dict`/`model`, or a
raykd model export. It is read with `weights_only=True`: a file that holds anything but tensors and
plain values is refused and nothing in it runs. Every key must find its parameter with the same
shape; `weights_skip` lists key prefixes to leave as initialised (a 1000-class head on a 10-class
job: `[fc]`, `[head]`, `[classifier]`). Anything else is one line naming the first few keys.
"""
from __future__ import annotations

from pathlib import Path

import torch

from raykd.errors import RaykdError, one_line
from raykd.files import torch_load
from raykd.models.staged import StagedModel


def original_keys(model: StagedModel) -> dict[str, str]:
    """The original module's key for each of the staged model's own (a block of a cut model
    keeps the module paths it runs: `blocks.layer1_0.layer1.0.conv1.weight` is
    `layer1.0.conv1.weight`); a zoo model's keys are its own."""
    out = {}
    for key in model.state_dict():
        parts = key.split(".")
        out[key] = ".".join(parts[2:]) if model.paths and parts[0] == "blocks" else key
    return out


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    if str(path).endswith(".safetensors"):   # the Hugging Face format timm publishes: tensors only
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise RaykdError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
    payload = torch_load(path)
    if isinstance(payload, dict):
        for field in ("state_dict", "model"):
            if isinstance(payload.get(field), dict):
                payload = payload[field]
                break
    if not isinstance(payload, dict) or not all(torch.is_tensor(v) for v in payload.values()):
        raise RaykdError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in payload.items()}   # saved from DDP too


def load_weights(model: StagedModel, path: str | Path, skip: list[str] = (),
                 where: str = "weights") -> StagedModel:
    """Copy the file's tensors into `model` (in place); one-line errors, nothing half-loaded."""
    state = read_state(path)
    own = model.state_dict()
    if set(state) <= set(own):   # a raykd export of this architecture: its own keys
        mine = {key: key for key in own}
    else:
        mine = {orig: key for key, orig in original_keys(model).items()}
    skipped = tuple(f"{p}." for p in skip) + tuple(skip)

    def kept(key: str) -> bool:
        return not any(key == p.rstrip(".") or key.startswith(p) for p in skipped)

    wanted = {k for k in mine if kept(k)}
    given = {k for k in state if kept(k)}
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    if missing or unexpected:
        what = (f"missing {', '.join(missing[:4])}" if missing else "") + \
            ("; " if missing and unexpected else "") + \
            (f"unexpected {', '.join(unexpected[:4])}" if unexpected else "")
        raise RaykdError(f"{where}: {path} does not fit the model ({what}); list key prefixes "
                         "to leave out in weights_skip (e.g. [fc])")
    for key in sorted(given):
        if tuple(state[key].shape) != tuple(own[mine[key]].shape):
            raise RaykdError(f"{where}: {path}: {key} has shape {tuple(state[key].shape)}, the "
                             f"model's is {tuple(own[mine[key]].shape)} (where it is meant to "
                             "differ, e.g. a classifier for another class count, leave it out "
                             "with weights_skip)")
    model.load_state_dict({**own, **{mine[k]: state[k] for k in given}})
    return model
