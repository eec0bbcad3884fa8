"""Streaming an ImageFolder tree through a torch DataLoader in the seeded batch order.

Nothing holds a whole folder: the dataset keeps (path, class) pairs and decodes each image in a
worker, through the model's timm transform. Batch order comes from one seeded
:class:`~nsvit_fast.data.batches.BatchStream`, so

- a resume replays the stream to the number of batches consumed, and ends in the batches (and, with
  augmentation, the same crops and flips) of an uninterrupted run;
- W torchrun ranks take ``batch[rank::W]`` of every global batch, together one process's batches.

Augmentation is seeded per sample from (seed, global batch number, position in the batch), not from
worker RNG, so it does not depend on the number of workers, on prefetching or on the rank.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import NsvitError
from .batches import BatchStream, check_even

AUGMENTS = ("rrc_flip", "official", "none")


def train_transform(parts, augment: str = "rrc_flip"):
    """The train augmentation, ending in pixels in [0, 1] (no normalisation: the adapter normalises).

    ``rrc_flip``: the official code's RandomResizedCrop (scale 0.08-1) + horizontal flip with timm's
    pieces and the model's interpolation (bicubic for timm's ViTs). ``official``: the official
    scripts' own (``train_hfai.py``): torchvision's ``RandomResizedCrop(size)`` (bilinear, scale
    0.08-1) + ``RandomHorizontalFlip()``. ``none``: the eval transform (resize, centre crop)."""
    from timm.data.transforms_factory import transforms_imagenet_train

    from .folders import pixel_transform

    if augment == "none":
        return pixel_transform(parts, train=False)
    if augment == "official":
        from torchvision import transforms as T

        _, h, w = parts.data_config["input_size"]
        return T.Compose([T.RandomResizedCrop((h, w)), T.RandomHorizontalFlip(), T.ToTensor()])
    if augment != "rrc_flip":
        raise NsvitError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    c, h, w = parts.data_config["input_size"]
    return transforms_imagenet_train((h, w), scale=(0.08, 1.0), hflip=0.5, color_jitter=None,
                                     interpolation=parts.data_config.get("interpolation", "bicubic"),
                                     mean=(0.0,) * c, std=(1.0,) * c)


class SeededFolder(Dataset):
    """(path, class) pairs of an ImageFolder tree; item ``(i, seed)`` decodes image i and applies the
    transform with Python's and torch's RNG seeded by ``seed`` (restored afterwards, so the caller's
    RNG streams are untouched when there are no workers)."""

    def __init__(self, root: str | Path, transform, name: str | None = None, on_bad_image: str = "error",
                 parts=None):
        from .folders import BAD_IMAGE, image_folder, read_rgb

        if on_bad_image not in BAD_IMAGE:
            raise NsvitError(f"on_bad_image must be one of {', '.join(BAD_IMAGE)}, got {on_bad_image!r}")
        folder = image_folder(root, parts, transform=None)  # checks the tree, labels by the model's class names
        self.samples, self.classes, self.loader = folder.samples, folder.classes, read_rgb
        self.transform, self.name, self.on_bad_image = transform, name or str(root), on_bad_image
        if not self.samples:
            raise NsvitError(f"{root} holds no images")
        import multiprocessing

        # unreadable files skipped so far, counted across DataLoader workers (passed to them at start)
        self.skips = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, 0)
        from .folders import BadImage

        for j in range(len(self.samples)):
            path, y = self.samples[(i + j) % len(self.samples)]
            try:
                img = self.loader(path)
                break
            except BadImage:
                # skip: the next readable file in folder order takes its place, so batches keep their
                # size and every rank and resume still agree on them
                if self.on_bad_image != "skip":
                    raise
                if j == 0:
                    with self.skips.get_lock():
                        self.skips.value += 1
        else:
            raise NsvitError(f"{self.name} holds no readable images (all {len(self.samples)} skipped: "
                             f"on_bad_image skip)")
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            x = self.transform(img)
        random.setstate(state)
        return x.clamp_(0, 1), y


def sample_seed(seed: int, batch_no: int, pos: int) -> int:
    """The augmentation seed of one sample: fixed by the run's seed, the global batch number and the
    position in the global batch (so independent of rank, workers and prefetching)."""
    return (int(seed) * 1_000_003 + int(batch_no) * 65_537 + int(pos)) % (2 ** 63 - 1)


class SeededBatchSampler(Sampler):
    """Endless lists of ``(index, seed)`` for this rank: global batch b of the BatchStream, sliced
    ``[rank::world]``, starting after ``start`` batches."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.start = rank, world, start

    def __iter__(self) -> Iterator[list]:
        stream = BatchStream(self.n, self.batch_size, self.seed)
        for _ in range(self.start):
            stream.next()
        b = self.start
        while True:
            idx = stream.next().tolist()
            yield [(idx[p], sample_seed(self.seed, b, p)) for p in range(self.rank, len(idx), self.world)]
            b += 1

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return 2 ** 62


class StreamingData:
    """An ImageFolder tree served as seeded batches on a device.

    Args:
        root: folder in ImageFolder layout (``root/<class>/<image>``).
        parts: the adapter (its timm data config gives size, crop and interpolation).
        batch_size: the global batch; each rank gets its ``[rank::world]`` slice.
        seed: batch order and augmentation seed.
        augment: ``rrc_flip`` (RandomResizedCrop + flip, timm's, the model's interpolation),
            ``official`` (torchvision's, bilinear, as the official scripts) or ``none`` (eval transform).
        workers, pin_memory, persistent_workers, prefetch_factor: as torch's DataLoader.

    ``batches()`` yields (x, y): x (b, C, H, W) float32 pixels in [0, 1] on ``device``, y (b,) int64.
    ``consumed`` counts the batches handed out; ``state_dict``/``load_state_dict`` carry it across a
    resume (the DataLoader's prefetched batches are not counted)."""

    def __init__(self, root: str | Path, parts, batch_size: int, seed: int = 0, augment: str = "rrc_flip",
                 workers: int = 0, pin_memory: bool | None = None, persistent_workers: bool = True,
                 prefetch_factor: int = 2, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                 on_bad_image: str = "error"):
        if int(batch_size) < 1:
            raise NsvitError(f"batch_size must be >= 1, got {batch_size}")
        from ..errors import MAX_WORKERS

        if not 0 <= int(workers) <= MAX_WORKERS:  # as the CLI's --workers: a typo, not a machine
            raise NsvitError(f"workers must be in [0, {MAX_WORKERS}], got {workers}")
        self.parts = parts
        self.dataset = SeededFolder(root, train_transform(parts, augment), on_bad_image=on_bad_image, parts=parts)
        self.batch_size, self.seed, self.augment = int(batch_size), int(seed), augment
        self.workers, self.device = int(workers), torch.device(device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.workers > 0
        self.prefetch_factor = int(prefetch_factor) if self.workers > 0 else None
        self.rank, self.world = rank, world
        self.consumed = 0
        self._it = None
        self._warned = False
        self._samples: dict[int, Any] = {}  # sample(n), read once: its pixels never change

    def reseeded(self, batch_size: int, seed: int) -> "StreamingData":
        """A stream over this one's files with its settings but its own batch size and seed, from
        its first batch: a finetuning round's synthesis stream. The folder is not scanned again
        (an ImageNet listing each round), and :meth:`sample` reads stay shared."""
        import copy
        import multiprocessing

        if int(batch_size) < 1:
            raise NsvitError(f"batch_size must be >= 1, got {batch_size}")
        new = copy.copy(self)
        new.batch_size, new.seed = int(batch_size), int(seed)
        new.consumed, new._it, new._warned = 0, None, False
        new.dataset = copy.copy(self.dataset)  # the same files, its own count of skipped reads (its warning's)
        new.dataset.skips = multiprocessing.Value("q", 0)
        return new

    def __len__(self) -> int:
        """Images this stream serves (a carved stream: those not held out)."""
        return len(self.dataset)

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    def _loader(self) -> DataLoader:
        check_even(len(self), self.batch_size, self.world, f"{self.dataset.name}")
        sampler = SeededBatchSampler(len(self), self.batch_size, self.seed, self.rank, self.world,
                                     start=self.consumed)
        # at most the CPUs this process may use (cgroups and SLURM cpusets too): torch warns past them,
        # and every batch is the same whatever the count (seeds are per sample)
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(self.workers, usable)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=workers,
                          pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
                          prefetch_factor=self.prefetch_factor,
                          # its own generator: creating an iterator must not draw from the global RNG
                          generator=torch.Generator().manual_seed(self.seed))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch (x, y) on the device."""
        if self._it is None:
            self._it = iter(self._loader())
        try:
            x, y = next(self._it)
        except NsvitError as e:  # from a worker, torch wraps the message in a traceback: keep our line
            lines = str(e).strip().splitlines()
            if len(lines) > 1:
                last = lines[-1]
                name = type(e).__name__
                head = last.split(": ", 1)[0]
                raise NsvitError(last.split(": ", 1)[1] if head.split(".")[-1] == name else last) from None
            raise
        self.consumed += 1
        if not self._warned and self.dataset.skips.value:  # once per run: the count so far
            import warnings

            self._warned = True
            warnings.warn(f"{self.dataset.name}: {self.dataset.skips.value} read(s) of unreadable images skipped so far "
                          f"(on_bad_image: skip), each replaced in its batch by the next readable file in folder order",
                          stacklevel=2)
        nb = self.pin_memory
        return x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

    def sample(self, n: int):
        """``n`` images of the folder spread evenly over it (so over its classes), read through the
        eval transform into an in-memory ImageDataset: held-out metrics, token statistics. Read
        once per stream and its :meth:`reseeded` copies (the same files every time): a run measures
        its noise on them every round."""
        n = max(1, min(int(n), len(self.dataset)))
        if n not in self._samples:
            idx = torch.linspace(0, len(self.dataset) - 1, n).round().long().tolist()
            self._samples[n] = self._read(self._view(idx, False), f"sample {n}")
        return self._samples[n]

    def _view(self, idx: list[int], own_skips: bool) -> SeededFolder:
        """This stream's folder restricted to files ``idx`` (an unreadable one is then replaced by the
        next readable file of the view, never by one outside it), with its own skip count if asked."""
        import multiprocessing

        view = SeededFolder.__new__(SeededFolder)
        view.__dict__.update(self.dataset.__dict__, samples=[self.dataset.samples[i] for i in idx])
        if own_skips:
            view.skips = multiprocessing.Value("q", 0)
        return view

    def _read(self, view: SeededFolder, what: str):
        """Every file of ``view`` through the eval transform, as an in-memory ImageDataset."""
        from .base import ImageDataset
        from .folders import pixel_transform

        view.transform = pixel_transform(self.parts, train=False)
        xs, ys = zip(*(view[i] for i in range(len(view))))
        return ImageDataset(torch.stack(xs), torch.tensor(ys), self.classes, name=f"{self.dataset.name}[{what}]")

    def carve(self, n: int, seed: int):
        """(stream, held-out): ``n`` images (at most a quarter of the folder) set aside by a seeded
        permutation, as in-memory held-out metrics read through the eval transform, and a new
        stream (this one's settings, from its first batch) over the rest of the folder, never
        serving them. Each side only ever reads its own files, also where an unreadable file is
        skipped (``on_bad_image: skip``). The in-memory :func:`~nsvit_fast.synth.engine.split_heldout`
        does the same for a tensor. Raises NsvitError when the folder is too small to hold any
        image out."""
        import copy

        total = len(self)
        h = min(int(n), total // 4)
        if h < 1:
            raise NsvitError(f"{self.dataset.name}: {total} image(s) cannot hold {n} out (at most a quarter of the "
                             f"folder): give a larger folder, heldout >= 1, or held-out data of your own")
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
        rest = copy.copy(self)
        rest.dataset = self._view(sorted(perm[h:].tolist()), False)  # skips counted as the stream's own
        rest.consumed, rest._it, rest._warned, rest._samples = 0, None, False, {}  # other files: its own samples
        view = self._view(sorted(perm[:h].tolist()), True)
        held = self._read(view, f"held out {h}")
        if view.skips.value:
            import warnings

            warnings.warn(f"{self.dataset.name}: {view.skips.value} unreadable held-out image(s) skipped "
                          f"(on_bad_image: skip), each replaced by the next readable held-out file", stacklevel=2)
        return rest, held

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "n": len(self), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state['consumed']`` batches; refuses a state from another folder or setting."""
        mine = {"seed": self.seed, "n": len(self), "batch_size": self.batch_size}
        for k, v in mine.items():
            if k in state and int(state[k]) != v:
                raise NsvitError(f"stream state is for {k}={state[k]}, this data has {k}={v}")
        self.consumed = int(state["consumed"])
        self._it = None

    def close(self) -> None:
        """Stops the workers (persistent ones otherwise live until the object is collected)."""
        self._it = None


def eval_loader(root: str | Path, parts, batch_size: int = 128, workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """A folder in order, through the model's eval transform (resize, centre crop): for evaluation
    suites over folders too large for memory. Yields (x, y) pixels in [0, 1] on the CPU."""
    from .folders import pixel_transform

    ds = SeededFolder(root, pixel_transform(parts, train=False), parts=parts)
    return DataLoader(ds, batch_size=int(batch_size), shuffle=False, num_workers=int(workers),
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
