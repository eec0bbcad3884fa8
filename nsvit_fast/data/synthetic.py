"""A synthetic, learnable image set for fast tests: each class is a smooth random template plus noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import check_count, check_number, check_seed
from .base import ImageDataset

SPLITS = ("train", "val", "test")  # as a data spec (synthetic:SPLIT): 512 / 256 / 256 images, seeds 0 / 1 / 2


def synthetic(n: int = 256, num_classes: int = 10, img_size: int = 32, channels: int = 3,
              noise: float = 0.1, seed: int = 0) -> ImageDataset:
    """A seeded, learnable image set: class c is a smooth random template (4x4 uniform noise,
    bilinearly upsampled) plus Gaussian pixel noise of std ``noise``, clamped to [0, 1].

    Args:
        n: images; labels cycle over the classes (0, 1, ..., num_classes - 1, 0, ...).
        num_classes, img_size, channels: the set's shape.
        noise: std of the per-pixel Gaussian noise.
        seed: templates and noise come from one generator seeded with it (same seed, same set).

    Returns:
        an ImageDataset: images (n, channels, img_size, img_size) float32, labels (n,) int64.

    Raises:
        NsvitError: counts that are not whole numbers >= 1, a noise that is not a finite number >= 0, a seed outside [0, 2**32 - 1].
    """
    n, num_classes, img_size, channels = (check_count(k, v) for k, v in (
        ("n", n), ("num_classes", num_classes), ("img_size", img_size), ("channels", channels)))
    noise = check_number("noise", noise, lo=0)
    g = torch.Generator().manual_seed(check_seed("seed", seed))
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(img_size, img_size), mode="bilinear", align_corners=False)
    labels = torch.arange(n) % num_classes
    x = templates[labels] + noise * torch.randn(n, channels, img_size, img_size, generator=g)
    return ImageDataset(x.clamp_(0, 1), labels, [str(c) for c in range(num_classes)], name=f"synthetic{num_classes}x{img_size}")
