"""Hand computations shared by several test files."""

import numpy as np
import torch


def eval_pixels(path, size, crop_pct, interpolation):
    """timm's eval transform by hand: shorter side to floor(size / crop_pct), centre crop, [0, 1]."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    short = int(size / crop_pct)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation])
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    img = img.crop((left, top, left + size, top + size))
    return torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255
