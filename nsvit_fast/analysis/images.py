"""Loading images for the analysis commands: files, or scikit-image's bundled photos offline."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import NsvitError

SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "coins", "moon")


def read_image(spec: str) -> torch.Tensor:
    """``skimage:astronaut`` (bundled, offline) or a file path -> (3, H, W) pixels in [0, 1]."""
    import numpy as np

    if spec.startswith("skimage:"):
        name = spec.split(":", 1)[1]
        from skimage import data as skd

        if name not in SKIMAGE or not hasattr(skd, name):
            raise NsvitError(f"unknown scikit-image photo {name!r} (try: {', '.join(SKIMAGE)})")
        arr = np.asarray(getattr(skd, name)())
    else:
        p = Path(spec)
        if not p.is_file():
            raise NsvitError(f"image not found: {p}")
        from ..data.folders import read_rgb

        arr = np.asarray(read_rgb(p))  # corrupt files and decompression bombs: one line naming the file
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    t = torch.from_numpy(arr[..., :3].astype(np.float32) / (255.0 if arr.dtype == np.uint8 else max(1.0, arr.max())))
    return t.permute(2, 0, 1).clamp(0, 1).contiguous()


def fit(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (C, H, W) to the model's input size (bilinear, antialiased)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def save_image(img: torch.Tensor, path: str | Path) -> Path:
    """(3, H, W) in [0, 1] -> 8-bit PNG, atomically."""
    import numpy as np
    from PIL import Image

    from ..io import atomic_path

    arr = (img.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


def logo(size: tuple[int, int], text: str = "NS") -> torch.Tensor:
    """A simple mark for demos: white text on black, (3, H, W)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    h, w = size
    im = Image.new("RGB", (w, h), (0, 0, 0))
    d = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=max(8, int(h * 0.55)))
    except TypeError:  # older Pillow
        font = ImageFont.load_default()
    box = d.textbbox((0, 0), text, font=font)
    d.text(((w - (box[2] - box[0])) / 2 - box[0], (h - (box[3] - box[1])) / 2 - box[1]), text, fill=(255, 255, 255),
           font=font)
    return torch.from_numpy(np.asarray(im).astype(np.float32) / 255).permute(2, 0, 1).contiguous()
