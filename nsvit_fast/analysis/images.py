"""Loading images for the analysis commands: files, or scikit-image's bundled photos offline."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import NsvitError

SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "cat", "camera", "coins", "moon")


def read_image(spec: str | Path) -> torch.Tensor:
    """Read one image as pixels.

    Args:
        spec: ``skimage:NAME`` (one of ``SKIMAGE``, bundled with scikit-image, offline) or a file path.

    Returns:
        (3, H, W) float32 pixels in [0, 1] (grey images copied to three channels, alpha dropped).

    Raises:
        NsvitError: an unknown scikit-image photo or a missing file; BadImage (an NsvitError) for a
            corrupt file or a decompression bomb.
    """
    spec = str(spec)
    import numpy as np

    if spec.startswith("skimage:"):
        name = spec.split(":", 1)[1]
        from skimage import data as skd

        if name not in SKIMAGE or not hasattr(skd, name):
            raise NsvitError(f"unknown scikit-image photo {name!r} (try: {', '.join(SKIMAGE)})")
        arr = np.asarray(getattr(skd, name)())
    else:
        p = Path(spec)
        if p.is_dir():
            raise NsvitError(f"{p} is a folder; give one image file")
        if not p.is_file():
            raise NsvitError(f"{p} is not a regular file (a pipe, device or socket)" if p.exists() else
                             f"image not found: {p}")
        from ..data.folders import BadImage, read_rgb

        try:
            arr = np.asarray(read_rgb(p))  # corrupt files and decompression bombs: one line naming the file
        except BadImage as e:  # its on_bad_image advice is for data folders, not one image given by name
            raise BadImage("; ".join(c for c in str(e).split("; ") if "on_bad_image" not in c)) from None
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    t = torch.from_numpy(arr[..., :3].astype(np.float32) / (255.0 if arr.dtype == np.uint8 else max(1.0, arr.max())))
    return t.permute(2, 0, 1).clamp(0, 1).contiguous()


def fit(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (C, H, W) to ``size`` = (H', W') (bilinear, antialiased); returns (C, H', W') in [0, 1]
    (``img`` itself when it already has that size)."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def save_image(img: torch.Tensor, path: str | Path) -> Path:
    """Write (3, H, W) pixels (clamped to [0, 1], rounded to 8 bits) as a PNG, atomically; returns the path."""
    import numpy as np
    from PIL import Image

    from ..io import atomic_path

    arr = (img.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


def logo(size: tuple[int, int], text: str = "NS") -> torch.Tensor:
    """A simple mark for demos: ``text`` in white, centred on black; (3, H, W) for ``size`` = (H, W)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    h, w = size
    im = Image.new("RGB", (w, h), (0, 0, 0))
    d = ImageDraw.Draw(im)
    try:
        # sized to fit both sides: a font sized by the height alone of a tall thin image renders
        # glyphs of a billion pixels (PIL's decompression-bomb error)
        font = ImageFont.load_default(size=max(8, int(min(h, w) * 0.55)))
    except TypeError:  # older Pillow
        font = ImageFont.load_default()
    box = d.textbbox((0, 0), text, font=font)
    d.text(((w - (box[2] - box[0])) / 2 - box[0], (h - (box[3] - box[1])) / 2 - box[1]), text, fill=(255, 255, 255),
           font=font)
    return torch.from_numpy(np.asarray(im).astype(np.float32) / 255).permute(2, 0, 1).contiguous()


def load_pair(parts, a: str | Path, b: str | Path, same_size: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images resized to the model's input size, each (1, 3, H, W) in [0, 1].

    Args:
        parts: the model's adapter (its ``img_size``).
        a: an image file or ``skimage:NAME``.
        b: the same; ``logo`` gives :func:`logo` at ``a``'s size.
        same_size: refuse images of different sizes (a watermark must match its image).

    Raises:
        NsvitError: as :func:`read_image`, or images of different sizes when ``same_size``.
    """
    x = read_image(a)
    y = logo(tuple(x.shape[-2:])) if str(b) == "logo" else read_image(b)
    if same_size and x.shape != y.shape:
        raise NsvitError(f"{b} is {y.shape[-1]}x{y.shape[-2]} but {a} is {x.shape[-1]}x{x.shape[-2]}: give images of "
                         f"one size (both are then resized to the model's {parts.img_size[1]}x{parts.img_size[0]})")
    return fit(x, parts.img_size)[None], fit(y, parts.img_size)[None]
