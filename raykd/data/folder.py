"""Your own images: `dataset: imagefolder`, torchvision's class-folder layout under `data.root`.

    ROOT/train/<class>/*.png|jpg|...     required
    ROOT/val/<class>/*                   optional: else carved from train (data.val_size)
    ROOT/test/<class>/*                  optional: else carved from train (data.test_size)

Every image is resized to `data.image_size` (pixels, square, or [height, width]; 224 by default)
and normalised as raykd.data.normalise says; grey or colour as the first training image is (the rest are
converted to its mode). The training split is augmented as `data.augment` says
(raykd.data.augment; `standard` by default), so the teacher-output cache is not used for it unless
that is `none`. Every file is checked to be a readable image before any Ray work: a bad one is
named in one line.
"""
from __future__ import annotations

import os
from pathlib import Path

from raykd.data.augment import preset, train_transforms
from raykd.data.normalise import normalisation
from raykd.data.registry import DatasetSplits, register_dataset, split_indices, subset
from raykd.errors import RaykdError, one_line
from raykd.job.specs import image_hw

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def class_files(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(file, class index)]) of one split folder; one-line errors for a folder
    with no class folders, a class with no images, or a file that is not a readable image."""
    from PIL import Image

    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise RaykdError(f"data.root: {folder} has no class folders; expected "
                         f"{folder}/<class>/<image files>")
    samples = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (folder / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in EXTENSIONS)
        if not files:
            raise RaykdError(f"data.root: class folder {folder / name} holds no images "
                             f"({', '.join(EXTENSIONS[:4])}, ...)")
        for path in files:
            try:
                with Image.open(path) as image:
                    image.verify()
            except Exception as e:
                raise RaykdError(f"data.root: {path} is not a readable image "
                                 f"({one_line(e)})") from None
            samples.append((str(path), index))
    return classes, samples


class ImageFiles:
    """A list of (image file, class) read as normalised tensors of one size and mode."""

    def __init__(self, samples: list[tuple[str, int]], transform, image_mode: str):
        self.samples, self.transform, self.mode = samples, transform, image_mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as image:
            return self.transform(image.convert(self.mode)), label


@register_dataset("imagefolder")
def imagefolder(spec) -> DatasetSplits:
    from PIL import Image
    from torchvision import transforms as T

    if not spec.root:
        raise RaykdError("dataset imagefolder needs data.root: a folder holding train/<class>/*")
    root = Path(os.path.expanduser(spec.root)).resolve()
    if not (root / "train").is_dir():
        raise RaykdError(f"data.root: no {root / 'train'} folder; expected "
                         f"{root}/train/<class>/<image files> (and optionally val/, test/)")
    classes, train = class_files(root / "train")
    with Image.open(train[0][0]) as first:
        image_mode = "L" if first.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    channels = 1 if image_mode == "L" else 3
    size = image_hw(spec.image_size or 224)
    mean, std = normalisation(spec, channels, "image folder")
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    resize = [T.Resize(size)]
    plain = T.Compose(resize + norm)
    augment = preset(spec.augment, "standard")
    augmented = T.Compose(train_transforms(augment, size, resize) + norm)
    held_out = {name: class_files(root / name) for name in ("val", "test")
                if (root / name).is_dir()}
    for name, (found, _) in held_out.items():
        if found != classes:
            raise RaykdError(f"data.root: {root / name} has classes {found[:5]}, train has "
                             f"{classes[:5]}: the same class folders are needed")
    val_size = 0 if "val" in held_out else (spec.val_size or max(1, len(train) // 10))
    test_size = 0 if "test" in held_out else (spec.test_size or max(1, len(train) // 10))
    tr, va, te = split_indices(len(train), val_size, test_size, spec.train_size,
                               spec.split_seed, str(root / "train"))
    every = ImageFiles(train, augmented, image_mode)
    fixed = ImageFiles(train, plain, image_mode)

    def held(name, indices):
        if name in held_out:
            return ImageFiles(held_out[name][1], plain, image_mode)
        return subset(fixed, indices)

    return DatasetSplits(train=subset(every, tr), val=held("val", va), test=held("test", te),
                         num_classes=len(classes), input_shape=(channels, *size),
                         deterministic=augment == "none")


def export_folder(name: str, out: str | Path, limit: int | None = None) -> int:
    """Write a built-in dataset that ships in a package (mnist5k, digits) as an image folder of
    real PNG files, OUT/train/<class>/NNNNN.png, so a job of your own (or jobs/imagefolder.yaml)
    runs on files offline; return the number written."""
    import numpy as np
    from PIL import Image

    from raykd.files import atomic_write

    if name == "mnist5k":
        from raykd.data.builtin import _mnist5k_arrays

        x, y = _mnist5k_arrays()
        pixels = (x[:, 0] * 255).round().astype(np.uint8)
    elif name == "digits":
        from raykd.data.builtin import digits_arrays

        images, y = digits_arrays()
        pixels = (images / 16.0 * 255).round().astype(np.uint8)
    else:
        raise RaykdError(f"raykd data export: {name!r} cannot be written as files; allowed: "
                         "mnist5k, digits")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RaykdError(f"raykd data export: {out} exists and is not empty; give a new folder")
    count = len(y) if limit is None else min(limit, len(y))
    order = np.random.default_rng(0).permutation(len(y))[:count]   # every class, not the first
    for i in order:
        path = out / "train" / str(int(y[i])) / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, i=i: Image.fromarray(pixels[i], mode="L").save(tmp, "PNG"))
    return count
