"""Published weights by name, from the local caches only: `weights: IMAGENET1K_V1` (or `DEFAULT`)
for a torchvision model names a member of its weights enum; `weights: pretrained` (timm's default
tag) or `weights: TAG` (`c3_in1k`) for a timm model names a pretrained tag. raykd never
downloads: the file must already be in torch's hub cache ($TORCH_HOME/hub/checkpoints) or the
Hugging Face hub cache ($HF_HUB_CACHE), where torchvision and timm put what they download; else
one line says which file is missing and how to fetch it where there is internet.

A name resolves to that local file, which then loads like `weights: PATH` (raykd.models.weights):
read without running code, checked key by key, the classifier of another class count left out
with `weights_skip`.
"""
from __future__ import annotations

import os
from pathlib import Path

from raykd.errors import RaykdError

FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".tar")


def is_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.endswith(FILE_SUFFIXES) \
        or Path(weights).expanduser().exists()


def resolve_weights(model: str, weights: str | None, where: str) -> str | None:
    """The local file `weights` means for `model` (an absolute path), or None."""
    if weights is None:
        return None
    if is_path(weights):
        return str(Path(weights).expanduser().resolve())
    source = model.split(":", 1)[0] if ":" in model else "zoo"
    if source in ("torchvision", "timm"):
        from raykd.models.sources import check_source

        check_source(model)     # an unknown model name first, with close matches
    if source == "torchvision":
        return _torchvision(model.split(":", 1)[1], weights, where)
    if source == "timm":
        return _timm(model.split(":", 1)[1], weights, where)
    raise RaykdError(f"{where}.weights: no such file {weights!r} (named weights are for "
                     "torchvision: and timm: models)")


def _hub_file(url: str) -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _torchvision(arch: str, tag: str, where: str) -> str:
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    members = list(enum.__members__)
    if tag not in members:
        raise RaykdError(f"{where}.weights: torchvision's {arch} has no weights {tag!r}; "
                         f"allowed: {', '.join(members)} (or a file path)")
    url = enum[tag].url
    path = _hub_file(url)
    if not path.is_file():
        raise RaykdError(f"{where}.weights={tag}: {path.name} is not in torch's hub cache "
                         f"({path.parent}); raykd never downloads: run torchvision.models."
                         f"{arch}(weights={tag!r}) where there is internet and copy that file "
                         "here (or give its path)")
    return str(path)


def _hf_cache_dir() -> str | None:
    return os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)


def _timm(arch: str, tag: str, where: str) -> str:
    import timm
    from timm.models import get_pretrained_cfg

    name = arch if tag == "pretrained" else f"{arch}.{tag}"
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:      # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise RaykdError(f"{where}.weights: timm's {arch} has no pretrained tag {tag!r}; allowed: "
                         f"{', '.join(['pretrained', *tags]) if tags else 'none (no weights)'}")
    looked = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors",
                                      "pytorch_model.bin")):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=_hf_cache_dir())
            if isinstance(found, str) and os.path.isfile(found):
                return found
        looked.append(f"{cfg.hf_hub_id} in the Hugging Face hub cache")
    if cfg.url:
        path = _hub_file(cfg.url)
        if path.is_file():
            return str(path)
        looked.append(f"{path}")
    raise RaykdError(f"{where}.weights={tag}: timm's {name} weights are not cached locally "
                     f"(looked for {' and '.join(looked) or 'nothing: it has no source'}); raykd "
                     f"never downloads: run timm.create_model({name!r}, pretrained=True) where "
                     "there is internet and copy the cache here (or give the file's path)")
