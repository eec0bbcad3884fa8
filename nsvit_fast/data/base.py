"""In-memory image datasets: pixels (N, C, H, W) float32 in [0, 1] and int64 labels."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..errors import NsvitError, check_count, check_labels, check_pixels


class ImageDataset(Dataset):
    """Images and labels held as two tensors; indexing gives (image, label).

    Engines that can work on whole tensors (synthesis, evaluation) read ``.images`` and ``.labels``
    directly instead of going through a DataLoader.

    Args:
        images: (N, C, H, W) float pixels in [0, 1], N >= 1.
        labels: (N,) class indices (stored as int64).
        classes: class names, index = label (default "0" .. str(max label)).
        name: shown in messages and ``repr``.

    Raises:
        NsvitError: no images, images not 4-D float, channels-last (B, H, W, C), outside [0, 1] or
            not finite; labels not a 1-D integer tensor of indices >= 0 of the same length; classes
            fewer than the labels need.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str] | None = None,
                 name: str = "images"):
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] == 0:
            raise NsvitError(f"{name} is empty")
        what = "" if name == "images" else f"{name}: "
        check_pixels(f"{what}images", images)
        if images.shape[1] not in (1, 3, 4) and images.shape[-1] in (1, 3, 4):  # found only at the model before
            raise NsvitError(f"{what}images look channels-last {tuple(images.shape)}: give (B, C, H, W), e.g. "
                             f"images.permute(0, 3, 1, 2)")
        labels = check_labels(f"{what}labels", labels, images.shape[0])
        top = int(labels.max()) + 1
        if classes is not None and (isinstance(classes, (str, bytes)) or not all(isinstance(c, str) for c in classes)
                                    or len(classes) < top):
            raise NsvitError(f"{name}: classes must be a list of names, one per label 0..{top - 1} at least, "
                             f"got {classes!r}"[:300])
        self.images = images
        self.labels = labels
        self.classes = list(classes) if classes is not None else [str(i) for i in range(top)]
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return tuple(self.images.shape[-2:])

    def subset(self, n: int | None = None, *, generator: torch.Generator | None = None) -> "ImageDataset":
        """The first n images (a random n if a generator is given) as a new ImageDataset sharing the
        classes; ``self`` when n is None or >= len(self)."""
        if n is not None:
            n = check_count("n", n)
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=generator)[:n] if generator is not None else torch.arange(n)
        return ImageDataset(self.images[idx], self.labels[idx], self.classes, f"{self.name}[:{n}]")

    def __repr__(self) -> str:
        return f"ImageDataset({self.name}, n={len(self)}, shape={tuple(self.images.shape[1:])}, classes={len(self.classes)})"


def check_labels_fit(num_classes: int, data, what: str = "the data") -> None:
    """Raise NsvitError if ``data``'s labels index past a model's ``num_classes`` outputs: the
    cross-entropy would raise mid-run, and an accuracy would count every such image wrong without a
    word. ``data``: an ImageDataset or anything with ``labels`` or ``classes``, or a folder path
    (its class folders). Data whose classes cannot be told cheaply is let through."""
    from pathlib import Path

    labels = getattr(data, "labels", None)
    if isinstance(labels, torch.Tensor):
        n = int(labels.max()) + 1 if labels.numel() else 0
    elif getattr(data, "classes", None):
        n = len(data.classes)
    elif isinstance(data, (str, Path)) and Path(data).is_dir():
        n = sum(1 for d in Path(data).iterdir() if d.is_dir() and not d.name.startswith("."))
    else:
        return
    if n > num_classes:
        raise NsvitError(f"{what} has {n} classes, the model {num_classes} outputs: its labels would index past "
                         f"them (another model or --num-classes {n}?)")
