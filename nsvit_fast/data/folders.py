"""Users' own data in ImageFolder layout (``root/<class>/<image>``), e.g. ImageNet's val folder.

Transforms come from the model's timm data config (resize, centre crop, interpolation) with
normalisation switched off: every nsvit-fast function takes pixels in [0, 1], and the adapter
normalises inside the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from torchvision.datasets import ImageFolder  # timm imports torchvision anyway: no extra cost
from torchvision.datasets.folder import IMG_EXTENSIONS as TV_EXTENSIONS, has_file_allowed_extension

from ..errors import NsvitError


def pixel_transform(parts, train: bool = False):
    """timm's transform for this model: PIL image -> (C, H, W) float32 pixels in [0, 1].

    Args:
        parts: the model's adapter; its ``data_config`` gives input size, crop_pct, crop_mode and
            interpolation (normalisation is switched off: the adapter normalises).
        train: timm's train transform (random resized crop, flip) instead of resize + centre crop.

    Returns:
        a torchvision ``Compose`` (timm's ``create_transform``).
    """
    from timm.data import create_transform

    cfg = parts.data_config
    c, h, w = cfg["input_size"]
    return create_transform(input_size=(c, h, w), is_training=train, mean=(0.0,) * c, std=(1.0,) * c,
                            crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"], interpolation=cfg["interpolation"])


def crop_transform(parts):
    """PIL image -> (C, H, W) float32 pixels in [0, 1], centre-cropped to the input size with no
    resize: what Hendrycks' ImageNet-C test.py and the official NS-ViT evaluation apply to sets
    stored at the input size (ImageNet-C, Stylized ImageNet: 224 px). timm's eval transform would
    resize them by 1 / crop_pct first, zooming in and smoothing the corruptions. An image smaller
    than the input size (224 px for a 384-px model) is first scaled up to cover it (UpToSize)."""
    from torchvision import transforms

    cfg = parts.data_config
    _, h, w = cfg["input_size"]
    return transforms.Compose([UpToSize(h, w, cfg["interpolation"]), transforms.CenterCrop((h, w)),
                               transforms.ToTensor()])


class UpToSize:
    """PIL image -> itself when it covers (h, w), else scaled up (aspect kept) until it does.
    CenterCrop alone pads a smaller image with black: a 224-px ImageNet-C image for a 384-px model
    would be scored inside a black frame. torchvision has no resize-only-if-smaller transform."""

    def __init__(self, h: int, w: int, interpolation: str = "bicubic"):
        self.h, self.w, self.interpolation = h, w, interpolation

    def __call__(self, img):
        if img.width >= self.w and img.height >= self.h:
            return img
        from timm.data.transforms import str_to_pil_interp

        scale = max(self.h / img.height, self.w / img.width)
        size = (max(self.w, round(img.width * scale)), max(self.h, round(img.height * scale)))
        return img.resize(size, str_to_pil_interp(self.interpolation))


BAD_IMAGE = ("error", "skip")


class BadImage(NsvitError):
    """An image file that cannot be decoded (corrupt, truncated, or a decompression bomb)."""


def _to_rgb(img):
    """PIL's convert("RGB") clips 16-bit and 32-bit integer pixels at 255 and truncates float ones
    (a 16-bit grey PNG at half scale comes out white, a float TIFF of 0.5 black): scale those to
    8 bits first. 16-bit modes are divided by 257; a 32-bit "I" image whose values exceed 255 is
    read as 16-bit; a float "F" image in [0, 1] is scaled by 255, otherwise read as 0-255. Raises
    ValueError for a float image holding NaN / inf (no pixel value to give it)."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError("its float pixels hold NaN or inf")
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif img.mode == "F" and a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255.0
        img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L")
    return img.convert("RGB")


def read_rgb(path: str | Path):
    """An image file as an RGB PIL image, decoded now.

    Raises BadImage naming the file if it is corrupt or truncated, or if it is larger than PIL's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 million pixels): such a file
    is refused before it is decoded, not after it has filled the memory."""
    import contextlib
    import stat
    import warnings

    from PIL import Image

    with contextlib.suppress(OSError):  # a missing file: open() below says so
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe's open() waits for a writer: for ever
            raise BadImage(f"{path} is not a readable image (not a regular file: a pipe, device or socket); "
                           f"remove it, or skip bad images (--on-bad-image skip, or on_bad_image: skip in a config)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open(path, "rb") as f:
                img = Image.open(f)
                img.load()
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"{path} is too large to decode safely ({str(e).split('(')[0].strip() or e}); "
                       f"refused as a possible decompression bomb") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports bad data as any of these
        raise BadImage(f"{path} is not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                       f"; remove it, or skip bad images (--on-bad-image skip, or on_bad_image: skip in a config)") from None


def check_no_symlink_loop(root: str | Path) -> None:
    """Raise NsvitError if a symlinked folder under ``root`` points back at one of its ancestors
    (torchvision's ImageFolder follows links and would read the same images over and over)."""
    import os

    root = Path(root)
    for top, dirs, _ in os.walk(root, followlinks=True):
        here = Path(top)
        ancestors = {os.path.realpath(p) for p in [here, *here.parents][: len(here.relative_to(root).parts) + 1]}
        for d in dirs:
            sub = here / d
            if sub.is_symlink() and os.path.realpath(sub) in ancestors:
                raise NsvitError(f"{sub} is a symlink loop (it points back to {os.path.realpath(sub)}); remove it")


def known_class_names(parts) -> list[str] | None:
    """The names of the model's outputs where they are known, in output order: those a finetune on a
    folder recorded (``parts.class_names``), the digits ("0"-"9") for digits_vit, timm's ImageNet
    synsets (``n01440764`` ...) for a 1000-output model; else None."""
    k = getattr(parts, "num_classes", None)
    own = getattr(parts, "class_names", None)
    if own is not None and len(own) == k:
        return list(own)
    if getattr(parts, "name", "") == "digits_vit" and k == 10:
        from .digits import CLASSES

        return list(CLASSES)
    if k == 1000:
        from timm.data import ImageNetInfo

        return list(ImageNetInfo().label_names())
    return None


SPLIT_FOLDERS = ("train", "val", "test")  # sub-folders of a data folder read as splits, not as classes


def class_folders(root: Path) -> list[str]:
    """The class folders of ``root``, sorted; dot-folders (``.ipynb_checkpoints``) are not classes."""
    import os

    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def class_index(root: str | Path, names: list[str] | None, num_classes: int | None = None
                ) -> tuple[list[str], dict[str, int]]:
    """(classes, class_to_idx) for an ImageFolder tree: by name where the model's class ``names``
    are known and every folder is one of them (a folder of some classes, a val set missing one, keep
    their labels); else by sorted position, as torchvision does, with a warning when the folder count
    differs from ``num_classes`` (a missing class shifts every later label).

    Raises:
        NsvitError: some folders are the model's class names and others are not."""
    import warnings

    root = Path(root)
    found = class_folders(root)
    if names is not None:
        known = [c for c in found if c in names]
        if known and len(known) < len(found):
            bad = next(c for c in found if c not in names)
            raise NsvitError(f"{root}: class folder {bad!r} is not one of the model's class names (its other folders "
                             f"are, e.g. {known[0]!r}); labels are read by name: rename or remove it")
        if known:
            idx = {n: i for i, n in enumerate(names)}
            return list(names), {c: idx[c] for c in found}
    if found and all(c.isascii() and c.isdigit() and str(int(c)) == c for c in found):
        # folders named by number (ImageNet-V2's "0"-"999"): by value where every one is an output
        # index, else in number order ("2" before "10"); torchvision's string order put "10" second
        if names is None and found != sorted(found, key=int):  # names unknown: a model trained on them before
            warnings.warn(f"{root}: class folders named by number are read in number order (2 before 10), not "
                          f"torchvision's string order; a model trained on them in string order (torchvision, or "
                          f"an nsvit-fast model saved without class_names) reads them differently", stacklevel=2)
        found = sorted(found, key=int)
        if num_classes is not None and int(found[-1]) < num_classes:
            if names is None and found == [str(i) for i in range(1, len(found) + 1)]:  # 1..k of a 1-based set
                warnings.warn(f"{root}: class folders named by number are read by value (folder {found[0]!r} is "
                              f"output {found[0]}), and there is no folder '0': if the classes are numbered from "
                              f"1, every label is one off (rename the folders 0..{num_classes - 1})", stacklevel=2)
            return [str(i) for i in range(num_classes)], {c: int(c) for c in found}
    if num_classes is not None and found and len(found) != num_classes:
        warnings.warn(f"{root}: {len(found)} class folders for a {num_classes}-output model, read by sorted position "
                      f"(their names are not the model's): a missing or extra class shifts every later label")
    return found, {c: i for i, c in enumerate(found)}


def adopt_class_names(parts, data) -> None:
    """A model whose outputs have no known names (:func:`known_class_names`) takes the classes of
    the data it is finetuned on, in label order, when they are one per output: a validation or
    evaluation folder is then read by name (by sorted position, a val folder missing one class and
    holding another shifted every label), and they are saved with the weights."""
    own = getattr(parts, "class_names", None)
    if not hasattr(parts, "class_names") or (own is None and known_class_names(parts) is not None):
        return  # digits_vit's digits, ImageNet's synsets: fixed by the model
    if isinstance(data, (str, Path)):
        if not Path(data).is_dir():
            return
        found = class_folders(Path(data))
        if own is not None and set(found) & set(own):
            return  # the classes it learned: read by them (a folder mixing in others is refused there)
        classes = class_index(Path(data), None, getattr(parts, "num_classes", None))[0]
    else:
        classes = getattr(data, "classes", None)
        if own is not None and classes and set(classes) & set(own):
            return
    # no recorded names, or none of them here: a new task, whose classes replace the old ones
    if classes and len(classes) == getattr(parts, "num_classes", None) and len(set(classes)) == len(classes):
        parts.class_names = [str(c) for c in classes]


def check_val_classes(parts, val, what: str = "the validation data") -> None:
    """Refuse validation data whose classes are not among the model's named outputs (by name they
    have no label; by position they would take another class's)."""
    names = getattr(parts, "class_names", None)
    if names is None or val is None:
        return
    classes = class_folders(Path(val)) if isinstance(val, (str, Path)) and Path(val).is_dir() else getattr(val, "classes", None)
    extra = [c for c in (classes or []) if c not in names]
    if extra:
        raise NsvitError(f"{what}: class {extra[0]!r} is not one of the model's named classes "
                         f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); labels are read by name")


def visible_image(path: str) -> bool:
    """An image file by extension, as torchvision's, that is not a dot-file: macOS leaves ``._x.JPEG``
    AppleDouble files beside each image in copied trees, which are not images."""
    return not os.path.basename(path).startswith(".") and has_file_allowed_extension(path, TV_EXTENSIONS)


class IndexedFolder(ImageFolder):
    """torchvision's ImageFolder with a given (classes, class_to_idx) (:func:`class_index`); dot-files
    are not samples."""

    def __init__(self, root, index: tuple[list[str], dict[str, int]], **kw):
        self._index = index
        if "extensions" not in kw:
            kw.setdefault("is_valid_file", visible_image)
        super().__init__(root, **kw)

    def find_classes(self, directory):
        return self._index


def image_folder(root: str | Path, parts, train: bool = False, transform="model"):
    """A torchvision ImageFolder over ``root`` with this model's pixel transform.

    Args:
        root: ``root/<class>/<image>``; the class index is the folder's name among the model's class
            names where they are known (:func:`known_class_names`), else its position in sorted
            order (:func:`class_index`). Dot-folders are skipped.
        parts: the model's adapter (for :func:`pixel_transform`); unused when ``transform`` is given.
        train: the train transform instead of the eval one.
        transform: replaces the model's pixel transform (None: PIL images).

    Returns:
        the ImageFolder: item i is ((C, H, W) pixels in [0, 1], class index) with the model's transform.

    Raises:
        NsvitError: the folder is missing, has no class folders, holds only split folders
            (train / val / test holding class folders: name one), holds no images, or holds a
            symlink loop. Reading a corrupt image raises :class:`BadImage` (an NsvitError) naming
            the file.
    """
    if transform == "model" and not hasattr(parts, "data_config"):
        raise NsvitError(f"image_folder needs the model's adapter (load_model(...)) for its transform, or "
                         f"transform=None; got parts={type(parts).__name__}")
    root = Path(root)
    if not root.is_dir():
        raise NsvitError(f"data folder not found: {root}")
    classes = class_folders(root)
    if not classes:
        raise NsvitError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    # train/ and val/ that hold class folders were read as two classes and scored without a word; a
    # class of images that happens to be named test is a class
    if set(classes) <= set(SPLIT_FOLDERS) and all(class_folders(root / c) for c in classes):
        raise NsvitError(f"data folder {root} holds the split folders {', '.join(classes)}, not class folders: "
                         f"give one of them (e.g. {root / classes[0]})")
    check_no_symlink_loop(root)
    names = known_class_names(parts) if parts is not None else None
    index = class_index(root, names, getattr(parts, "num_classes", None))

    try:
        return IndexedFolder(str(root), index, transform=pixel_transform(parts, train) if transform == "model"
                             else transform, loader=read_rgb)
    except FileNotFoundError as e:
        raise NsvitError(f"{root}: {str(e).splitlines()[0]}") from None
