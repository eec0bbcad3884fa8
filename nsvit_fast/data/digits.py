"""scikit-learn's bundled digits (1797 real 8x8 scans, offline) as 32x32 RGB pixels in [0, 1].

Upsampling: the 0..16 grey levels are divided by 16, resized 8x8 -> 32x32 with bilinear
interpolation (torch ``interpolate``, ``align_corners=False``, no antialias), clamped to [0, 1],
and copied to the three colour channels. Splits are fixed and stratified (random_state 0):
1200 train, 200 val, 397 test.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .base import ImageDataset

SPLITS = {"train": 1200, "val": 200, "test": 397}
CLASSES = [str(i) for i in range(10)]


@lru_cache(maxsize=4)
def _arrays(size: int):
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=SPLITS["test"], stratify=d.target, random_state=0)
    train, val = train_test_split(rest, test_size=SPLITS["val"], stratify=d.target[rest], random_state=0)
    return x, y, {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def digits(split: str = "train", size: int = 32) -> ImageDataset:
    """One fixed split of the digits (see the module docstring).

    Args:
        split: ``train`` (1200), ``val`` (200), ``test`` (397) or ``all`` (1797).
        size: image side in pixels (32 for the embedded model; 8 is the scans' own size).

    Returns:
        an ImageDataset: images (N, 3, size, size) float32 in [0, 1], labels (N,) int64, classes "0"-"9".

    Raises:
        NsvitError: an unknown split, a size that is not a whole number >= 1.
    """
    from ..errors import check_count

    x, y, idx = _arrays(check_count("size", size))
    if split == "all":
        return ImageDataset(x, y, CLASSES, name="digits/all")
    if split not in idx:
        from ..errors import NsvitError

        raise NsvitError(f"digits has splits train, val, test, all; not {split!r}")
    i = torch.from_numpy(idx[split])
    return ImageDataset(x[i], y[i], CLASSES, name=f"digits/{split}")
