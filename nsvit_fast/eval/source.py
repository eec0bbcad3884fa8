"""Evaluation images handed out in order, batch by batch: held in memory, or streamed from a folder.

Every suite reads its images through :meth:`EvalImages.batches`, so a suite's loop is one loop for
both: attacks run per batch and hits are summed. :class:`TensorImages` slices tensors already in
memory (digits, small sets); :class:`FolderImages` streams an ImageFolder tree (ImageNet val, -C,
-A, -R, ...) through a DataLoader and the model's timm eval transform, holding one batch at a time.
Both give the same batches of the same images in the same order, so the numbers agree (with one
exception under ``on_bad_image="skip"``, see :class:`FolderImages`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import torch

from ..errors import NsvitError, check_labels, check_pixels


class EvalImages(ABC):
    """The interface: ``len()`` images with labels, ``classes`` (names or None), ``batches``."""

    classes: list[str] | None = None

    @abstractmethod
    def __len__(self) -> int:
        """The number of images."""

    @abstractmethod
    def batches(self, batch_size: int, n: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x (B, C, H, W) pixels in [0, 1], y (B,) int64) on the CPU, in order, ``batch_size`` at a
        time (the last batch may be smaller); only ``n`` images if given, spread evenly over the set
        (:func:`spread`), so a class-sorted folder gives every class, not the first one or two."""

    @abstractmethod
    def subset(self, n: int) -> "EvalImages":
        """``n`` of the images, as ``max_images`` picks them (the class's docstring says how); the
        set itself when it holds no more than ``n``."""


class TensorImages(EvalImages):
    """Images (N, C, H, W) and labels (N,) already in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str] | None = None):
        check_pixels("images", images)  # uint8 or 0-255 pixels would be scored, wrongly, without a word
        labels = check_labels("labels", labels, images.shape[0])
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> "TensorImages":
        """The first ``n`` images, as ``load_data`` cuts a named (shuffled) set, or ``n`` spread
        over the set where its labels are sorted (a folder read whole: the first n are one class)."""
        if n >= len(self):
            return self
        ordered = len(self.labels) > 1 and bool((self.labels[1:] >= self.labels[:-1]).all())
        keep = spread(len(self), n) if ordered else list(range(int(n)))
        return TensorImages(self.images[keep], self.labels[keep], self.classes)

    def batches(self, batch_size: int, n: int | None = None):
        keep = spread(len(self), n)
        images, labels = (self.images, self.labels) if keep is None else (self.images[keep], self.labels[keep])
        for i in range(0, len(labels), int(batch_size)):
            yield images[i:i + int(batch_size)], labels[i:i + int(batch_size)]


class FolderImages(EvalImages):
    """An ImageFolder tree streamed through the model's eval transform (resize, centre crop), never
    read whole. ``max_images`` keeps that many images spread evenly over the folder (the same ones
    :func:`nsvit_fast.data.load_data` reads into memory). ``workers`` DataLoader workers decode;
    ``pin_memory`` for CUDA. An unreadable file stops the run naming it (``on_bad_image="error"``) or,
    with ``"skip"``, is left out of the batch and counted, as the in-memory path does: one warning
    per run names how many and the first (a substitute would count another image twice), and
    ``skipped`` holds their paths. The one difference from the in-memory path: an attack's ``n``
    images are spread over the folder's files before the unreadable ones are known, so it attacks
    fewer than ``n`` where one of them is unreadable (the attack warns); in memory they are spread
    over the readable images. A pass that reads no image at all raises NsvitError."""

    def __init__(self, root: str | Path, parts, max_images: int | None = None, workers: int = 0,
                 pin_memory: bool = False, on_bad_image: str = "error"):
        from ..data.folders import pixel_transform
        from ..data.stream import SeededFolder

        root = Path(root)
        if not root.is_dir():
            named = str(root).partition(":")[0] in ("digits", "synthetic")
            raise NsvitError(f"data folder not found: {root}" + (" (for a named set pass load_data's ImageDataset: "
                                                                 f"load_data({str(root)!r}, parts=...))" if named else ""))
        self.dataset = SeededFolder(root, pixel_transform(parts, train=False), str(root), on_bad_image, parts=parts)
        self.classes = list(self.dataset.classes)
        self.indices = spread(len(self.dataset), max_images)
        self.workers, self.pin_memory, self.root = int(workers), bool(pin_memory), root
        self.skipped: set[str] = set()
        self._warned = False

    def __len__(self) -> int:
        return len(self.dataset) if self.indices is None else len(self.indices)

    def subset(self, n: int) -> "FolderImages":
        import copy

        pick = spread(len(self), n)
        if pick is None:
            return self
        out = copy.copy(self)
        keep = list(range(len(self.dataset))) if self.indices is None else self.indices
        out.indices, out.skipped = [keep[i] for i in pick], set()
        return out

    def batches(self, batch_size: int, n: int | None = None):
        from torch.utils.data import DataLoader, Subset

        keep = list(range(len(self.dataset))) if self.indices is None else self.indices
        pick = spread(len(keep), n)
        if pick is not None:
            keep = [keep[i] for i in pick]
        ds = _Droppable(self.dataset)
        ds = ds if len(keep) == len(self.dataset) else Subset(ds, keep)
        bad: list[str] = []
        read = 0
        for x, y, b in DataLoader(ds, batch_size=int(batch_size), shuffle=False, num_workers=self.workers,
                                  pin_memory=self.pin_memory, collate_fn=_collate):
            bad += b
            read += len(y)
            if len(y):
                yield x, y
        self.skipped.update(bad)
        if bad and not read and pick is None:  # a whole pass: every suite would fail its own way
            raise NsvitError(f"{self.root}: no readable image among the {len(bad)} read (all skipped, "
                             f"on_bad_image: skip), e.g. {bad[0]}")
        if bad and not self._warned:  # once per run, though every suite makes a pass
            import warnings

            self._warned = True
            warnings.warn(f"{self.root}: skipped {len(bad)} unreadable image(s) (on_bad_image: skip), "
                          f"e.g. {bad[0]}", stacklevel=2)


class _Droppable(torch.utils.data.Dataset):
    """A SeededFolder's images through its transform, an unreadable one (under on_bad_image skip)
    given back as (None, label, path) for the collate to leave out, instead of being replaced."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int):
        from ..data.folders import BadImage

        path, y = self.folder.samples[i]
        try:
            img = self.folder.loader(path)
        except BadImage:
            if self.folder.on_bad_image != "skip":
                raise
            return None, y, str(path)
        return self.folder.transform(img).clamp_(0, 1), y, None


def spread(total: int, n: int | None) -> list[int] | None:
    """Indices of ``n`` of ``total`` items spread evenly over them (first and last included), as
    ``max_images`` picks a folder's images; None for all of them (no ``n``, or ``n >= total``)."""
    if n is None or int(n) >= total:
        return None
    return torch.linspace(0, total - 1, int(n)).round().long().tolist()


def progress_bar(batches, total: int | None, desc: str, progress: bool):
    """``batches`` through a per-batch tqdm bar: on a terminal only, and gone when done (the suite's
    timing line follows); none at all when ``progress`` is False."""
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc=desc, unit="batch", leave=False, disable=None if progress else True)


def _collate(items):
    keep = [(x, y) for x, y, _ in items if x is not None]
    bad = [p for x, _, p in items if x is None]
    if not keep:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    return torch.stack([x for x, _ in keep]), torch.tensor([y for _, y in keep], dtype=torch.long), bad


def as_eval_images(data, parts=None, max_images: int | None = None, **folder_kw) -> EvalImages:
    """``data`` as EvalImages: an ImageDataset (held in memory), an EvalImages, or a folder path
    (streamed through ``parts``' eval transform; ``folder_kw`` to FolderImages), each cut to
    ``max_images`` as ``load_data`` cuts it: a folder's spread over its classes (:func:`spread`),
    an in-memory set's first ones (digits is shuffled), or spread where its labels are sorted.
    Raises NsvitError for anything else, or a folder without the model."""
    from ..data.base import ImageDataset

    if isinstance(data, EvalImages):
        return data if not max_images else data.subset(max_images)
    if isinstance(data, ImageDataset):
        return TensorImages(data.images, data.labels, getattr(data, "classes", None)).subset(max_images or len(data))
    if isinstance(data, (str, Path)):
        if parts is None:
            raise NsvitError("a folder of images needs the model (for its input size and transform)")
        return FolderImages(data, parts, max_images, **folder_kw)
    raise NsvitError(f"data must be an ImageDataset, EvalImages or a folder path, got {type(data).__name__}")
