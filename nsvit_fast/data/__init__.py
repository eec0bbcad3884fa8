"""Data: the embedded digits set, a synthetic generator for tests, and users' ImageFolder trees.

One spec names data everywhere (the CLI's ``--data``, YAML's ``data:``, the API's
:func:`load_data`): ``digits`` or ``digits:SPLIT``, ``synthetic`` or ``synthetic:SPLIT``, or a
folder path. A split is given in the spec or as ``split=`` (both at once must agree). A folder is
read as it is; one whose sub-folders are split folders (``train``, ``val``, ``test``) is refused
unless a split names one: nothing ever picks a split folder, least of all ``train/``, on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import NsvitError
from .base import ImageDataset
from .digits import digits
from .folders import BAD_IMAGE, SPLIT_FOLDERS, BadImage, image_folder, pixel_transform
from .synthetic import SPLITS as SYNTHETIC_SPLITS
from .synthetic import synthetic

DATASETS = ("digits", "synthetic")  # the named, built-in data sets


@dataclass(frozen=True)
class DataSpec:
    """A resolved data spec: ``kind`` is ``digits``, ``synthetic`` or ``folder``; ``split`` the
    named set's split (None for a folder); ``root`` the folder to read (None for a named set)."""

    kind: str
    split: str | None = None
    root: Path | None = None


def split_folders(root: str | Path) -> list[str]:
    """The split folders (``train``, ``val``, ``test``) directly under ``root``, in that order."""
    root = Path(root)
    return [s for s in SPLIT_FOLDERS if (root / s).is_dir()]


def parse_spec(spec: str | Path, split: str | None = None, *, default_split: str = "train") -> DataSpec:
    """Resolve a data spec without reading any image.

    Args:
        spec: ``digits[:SPLIT]``, ``synthetic[:SPLIT]``, or a folder path (ImageFolder layout,
            ``root/<class>/<image>``, or a folder of split folders with ``split`` naming one). A
            string that names a built-in set means that set even where a folder of that name
            exists (with a warning); write ``./digits`` or pass a ``Path`` for the folder.
        split: the split; for a named set it must agree with the spec's own, for a folder it names
            the sub-folder ``spec/split`` to read. None: the spec's split, else ``default_split``
            for a named set, the folder itself for a folder.
        default_split: the split of a named set given without one (``train`` for training; the
            evaluation command passes ``test``).

    Returns:
        a :class:`DataSpec`.

    Raises:
        NsvitError: an empty spec, a spec that is neither a named set nor an existing folder, a
            split unknown to the named set, two disagreeing splits, a folder without the named split
            folder, or a folder of split folders with no split named.
    """
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise NsvitError(f"data must be digits[:split], synthetic[:split] or a folder, got {spec!r}")
    if split is not None and (not isinstance(split, str) or not split.strip()):
        raise NsvitError(f"split must be a non-empty name, got {split!r}")
    text = str(spec)
    root = Path(text)
    # A named set's name wins over a folder of that name in the working directory, so that
    # `--data digits` means the same data wherever it runs; write ./digits for the folder.
    named = isinstance(spec, str) and text.partition(":")[0] in DATASETS and os.sep not in text
    if named and root.is_dir():
        import warnings
        warnings.warn(f"data {text!r} is the built-in set; the folder of that name here is not read "
                      f"(write ./{text} for it)", stacklevel=2)
    if not named and root.is_dir():
        found = split_folders(root)
        if split is None:
            if found:
                # the command's own split as the example: train for synth and finetune (it said val)
                pick = default_split if default_split in found else ("val" if "val" in found else found[0])
                raise NsvitError(f"data folder {root} holds the split folders {', '.join(found)}: name one "
                                 f"(e.g. {root / pick}); a split is never picked on its own")
            return DataSpec("folder", None, root)
        if not (root / split).is_dir():
            has = f"its split folders: {', '.join(found)}" if found else "it holds no split folders; give it " \
                                                                          "without a split to read it whole"
            raise NsvitError(f"data folder {root} has no split folder {split!r} ({has})")
        return DataSpec("folder", None, root / split)
    name, colon, own = text.partition(":")
    if name not in DATASETS:
        raise NsvitError(f"data {text!r} is neither digits[:split], synthetic[:split] nor an existing folder")
    if colon and not own:
        raise NsvitError(f"data {text!r} ends in ':': give a split after it (e.g. {name}:val) or none")
    if own and split is not None and own != split:
        raise NsvitError(f"data {text!r} names split {own!r} but split {split!r} was given: give one")
    chosen = own or split or default_split
    known = ("train", "val", "test", "all") if name == "digits" else SYNTHETIC_SPLITS
    if chosen not in known:
        raise NsvitError(f"{name} has splits {', '.join(known)}; not {chosen!r}")
    return DataSpec(name, chosen, None)


def _check_options(max_images, on_bad_image) -> int | None:
    """``max_images`` as an int (a whole float such as 5.0 is 5), after checking both."""
    try:
        bad = max_images is not None and (isinstance(max_images, bool) or int(max_images) != max_images
                                          or max_images < 1)
    except (TypeError, ValueError):
        bad = True
    if bad:
        raise NsvitError(f"max_images must be a whole number >= 1 (or None for all), got {max_images!r}")
    if on_bad_image not in BAD_IMAGE:
        raise NsvitError(f"on_bad_image must be one of {', '.join(BAD_IMAGE)}, got {on_bad_image!r}")
    return None if max_images is None else int(max_images)


def load_data(spec: str | Path, split: str | None = None, parts=None, max_images: int | None = None,
              on_bad_image: str = "error", *, default_split: str = "train", progress: bool = True) -> ImageDataset:
    """Read the data a spec names (see :func:`parse_spec`) into memory.

    A folder is read whole (or ``max_images`` of it, spread evenly over its classes) through the
    model's timm eval transform; use :func:`stream_or_load` or
    :class:`~nsvit_fast.data.stream.StreamingData` for folders too large for memory.

    Args:
        spec, split, default_split: as :func:`parse_spec`.
        parts: the model's adapter; needed for a folder (input size and transform); ``synthetic``
            is drawn at its (square) input size, 32 x 32 without it.
        max_images: at most this many images (>= 1), the first ones of a named set; None: all.
        on_bad_image: ``error`` stops at the first unreadable image of a folder, naming it;
            ``skip`` leaves such images out and warns how many.
        progress: a reading bar for a folder of 200 images or more, on a terminal only.

    Returns:
        an :class:`ImageDataset`: images (N, C, H, W) float32 in [0, 1], labels (N,) int64.

    Raises:
        NsvitError: everything :func:`parse_spec` raises; a bad ``max_images`` or ``on_bad_image``;
            a folder without ``parts``, without class folders, or without readable images.
        BadImage: an unreadable image in a folder with ``on_bad_image="error"`` (an NsvitError).
    """
    max_images = _check_options(max_images, on_bad_image)
    s = parse_spec(spec, split, default_split=default_split)
    if s.kind == "digits":
        ds = digits(s.split)
    elif s.kind == "synthetic":
        size = tuple(getattr(parts, "img_size", (32, 32)))  # a 224 model took 32 x 32 images: a shape error
        ds = synthetic(n=512 if s.split == "train" else 256, img_size=size[0] if size[0] == size[1] else 32,
                       seed=SYNTHETIC_SPLITS.index(s.split))
    else:
        if parts is None:
            raise NsvitError("a folder of images needs the model (for its input size and transform)")
        if not hasattr(parts, "data_config"):
            raise NsvitError(f"parts must be the model's adapter (load_model(...)), got {type(parts).__name__}")
        ds = _materialise(image_folder(s.root, parts), max_images, str(s.root), on_bad_image, progress)
    return ds.subset(max_images) if max_images else ds


def stream_or_load(spec: str | Path | None, parts, split: str | None = None, max_images: int | None = None,
                   on_bad_image: str = "error", *, default_split: str = "train",
                   progress: bool = True) -> ImageDataset | Path | None:
    """The form each engine takes: a folder without ``max_images`` as its resolved Path (to be
    streamed: nothing holds it whole), anything else read by :func:`load_data`.

    Args: as :func:`load_data`; ``spec`` None gives None (no data).

    Returns:
        None, the folder's Path (a split folder when ``split`` names one), or an ImageDataset.

    Raises:
        NsvitError: as :func:`load_data`.
    """
    if spec is None:
        return None
    max_images = _check_options(max_images, on_bad_image)
    s = parse_spec(spec, split, default_split=default_split)
    if s.kind == "folder" and max_images is None:
        return s.root
    return load_data(spec, split, parts, max_images, on_bad_image, default_split=default_split, progress=progress)


def _materialise(folder, max_images: int | None, name: str, on_bad_image: str = "error",
                 progress: bool = True) -> ImageDataset:
    import torch
    from tqdm.auto import tqdm

    n = len(folder) if max_images is None else min(len(folder), max_images)
    if n == 0:
        raise NsvitError(f"{name} holds no images")
    idx = torch.linspace(0, len(folder) - 1, n).round().long().tolist()  # spread over the classes
    xs, ys, bad = [], [], []
    # None: tqdm's own test, off where stderr is not a terminal (a log, a pipe: one error line there)
    for i in tqdm(idx, desc=f"reading {name}", leave=False, disable=True if n < 200 or not progress else None):
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


__all__ = ["ImageDataset", "DataSpec", "digits", "synthetic", "image_folder", "pixel_transform", "load_data",
           "parse_spec", "stream_or_load", "split_folders", "DATASETS", "SPLIT_FOLDERS", "BAD_IMAGE"]
