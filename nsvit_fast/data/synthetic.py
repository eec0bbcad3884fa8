"""A synthetic, learnable image set for fast tests: each class is a smooth random template plus noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ImageDataset


def synthetic(n: int = 256, num_classes: int = 10, img_size: int = 32, channels: int = 3,
              noise: float = 0.1, seed: int = 0) -> ImageDataset:
    """n images (n, channels, img_size, img_size) in [0, 1]; labels cycle over the classes."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(img_size, img_size), mode="bilinear", align_corners=False)
    labels = torch.arange(n) % num_classes
    x = templates[labels] + noise * torch.randn(n, channels, img_size, img_size, generator=g)
    return ImageDataset(x.clamp_(0, 1), labels, name=f"synthetic{num_classes}x{img_size}")
