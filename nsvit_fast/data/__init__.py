"""Data: the embedded digits set, a synthetic generator for tests, and users' ImageFolder trees."""

from __future__ import annotations

from pathlib import Path

from ..errors import NsvitError
from .base import ImageDataset
from .digits import digits
from .folders import BAD_IMAGE, BadImage, image_folder, pixel_transform
from .synthetic import synthetic


def load_data(spec: str, split: str = "train", parts=None, max_images: int | None = None,
              on_bad_image: str = "error"):
    """Resolve a data spec: ``digits``, ``synthetic``, or a folder path (ImageFolder layout).

    A folder is read whole into memory as an ImageDataset (through the model's pixel transform),
    which is what the synthesis and evaluation engines want; use :func:`image_folder` with a
    DataLoader for data too large for that. ``on_bad_image``: ``error`` (default) stops at the first
    unreadable image, naming it; ``skip`` leaves such images out and logs how many."""
    if max_images is not None and (isinstance(max_images, bool) or int(max_images) != max_images
                                   or max_images < 1):
        raise NsvitError(f"max_images must be a whole number >= 1 (or None for all), got {max_images!r}")
    if on_bad_image not in BAD_IMAGE:
        raise NsvitError(f"on_bad_image must be one of {', '.join(BAD_IMAGE)}, got {on_bad_image!r}")
    if spec == "digits":
        ds = digits(split)
    elif spec == "synthetic":
        ds = synthetic(n=512 if split == "train" else 256, seed={"train": 0, "val": 1, "test": 2}.get(split, 3))
    else:
        root = Path(spec)
        if not root.is_dir():
            raise NsvitError(f"data {spec!r} is neither 'digits', 'synthetic' nor an existing folder")
        if parts is None:
            raise NsvitError("a folder of images needs the model (for its input size and transform)")
        if (root / split).is_dir():
            root = root / split
        folder = image_folder(root, parts)
        ds = _materialise(folder, max_images, str(root), on_bad_image)
    return ds.subset(max_images) if max_images else ds


def _materialise(folder, max_images: int | None, name: str, on_bad_image: str = "error") -> ImageDataset:
    import torch
    from tqdm.auto import tqdm

    n = len(folder) if max_images is None else min(len(folder), max_images)
    if n == 0:
        raise NsvitError(f"{name} holds no images")
    idx = torch.linspace(0, len(folder) - 1, n).round().long().tolist()  # spread over the classes
    xs, ys, bad = [], [], []
    for i in tqdm(idx, desc=f"reading {name}", leave=False, disable=n < 200):
        try:
            x, y = folder[i]
        except BadImage:
            if on_bad_image != "skip":
                raise
            bad.append(folder.samples[i][0])
            continue
        xs.append(x)
        ys.append(y)
    if bad:
        import warnings

        warnings.warn(f"{name}: skipped {len(bad)} unreadable image(s) (on_bad_image: skip), e.g. {bad[0]}",
                      stacklevel=2)
    if not xs:
        raise NsvitError(f"{name} holds no readable images ({len(bad)} skipped)")
    return ImageDataset(torch.stack(xs).clamp_(0, 1), torch.tensor(ys), folder.classes, name=name)


__all__ = ["ImageDataset", "digits", "synthetic", "image_folder", "pixel_transform", "load_data"]
