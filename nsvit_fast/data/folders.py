"""Users' own data in ImageFolder layout (``root/<class>/<image>``), e.g. ImageNet's val folder.

Transforms come from the model's timm data config (resize, centre crop, interpolation) with
normalisation switched off: every nsvit-fast function takes pixels in [0, 1], and the adapter
normalises inside the model.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import NsvitError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")


def pixel_transform(parts, train: bool = False):
    """timm's eval (or train) transform for this model, ending in pixels in [0, 1]."""
    from timm.data import create_transform

    cfg = parts.data_config
    c, h, w = cfg["input_size"]
    return create_transform(input_size=(c, h, w), is_training=train, mean=(0.0,) * c, std=(1.0,) * c,
                            crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"], interpolation=cfg["interpolation"])


def image_folder(root: str | Path, parts, train: bool = False):
    """A torchvision ImageFolder over ``root`` with this model's pixel transform.

    Raises NsvitError if the folder is missing, has no class folders, or holds no images."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise NsvitError(f"data folder not found: {root}")
    classes = [p for p in root.iterdir() if p.is_dir()]
    if not classes:
        raise NsvitError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    try:
        return ImageFolder(str(root), transform=pixel_transform(parts, train))
    except FileNotFoundError as e:
        raise NsvitError(f"{root}: {str(e).splitlines()[0]}") from None
