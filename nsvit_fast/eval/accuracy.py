"""Top-1 accuracy and the eval-mode switch around it: the one copy every engine uses.

``eval_mode`` puts a model in eval mode and gives it back in the mode it had, also when the body
raises (an attack that fails half way must not leave a training model in eval mode). ``accuracy``
scores images in batches under it. This module needs torch alone, so ``train``, ``pretrain`` and
``analysis`` import it without pulling in the rest of evaluation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import NsvitError, check_count, check_labels, check_pixels


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Context manager: ``model.eval()`` inside, the previous mode (train or eval) restored on exit,
    also on an exception. Yields the model. Only the top-level flag is saved: submodules that were in
    a mode of their own come back in the top-level mode, as with ``model.train(was)``."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def check_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` back, after refusing NaN / inf ones (argmax would pick an arbitrary class:
    weights near float32's limit gave a silent 3% accuracy). Raises NsvitError."""
    if not bool(torch.isfinite(logits).all()):
        raise NsvitError("the model gives NaN or inf logits (weights that overflow or diverged): accuracy is undefined")
    return logits


def top1(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of finite logits (:func:`check_logits`)."""
    return check_logits(logits).argmax(-1)


@torch.no_grad()
def accuracy(parts, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``parts`` (an adapter or any classifier module) on ``images`` (B, C, H, W)
    and ``labels`` (B,), in eval mode, batches moved to the model's device; the model's mode is
    restored afterwards. Returns a fraction in [0, 1]. Raises NsvitError on an empty set, images
    that are not float pixels in [0, 1], labels that are not class indices below the model's outputs
    or not one per image, a batch_size < 1."""
    if isinstance(labels, torch.Tensor) and len(labels) == 0:
        raise NsvitError("accuracy of an empty image set is undefined")
    check_pixels("images", images)
    labels = check_labels("labels", labels, images.shape[0], getattr(parts, "num_classes", None) or None)
    batch_size = check_count("batch_size", batch_size)
    dev = next(parts.parameters()).device
    with eval_mode(parts):
        hits = 0
        for i in range(0, len(labels), batch_size):
            pred = top1(parts(images[i:i + batch_size].to(dev))).cpu()
            hits += int((pred == labels[i:i + batch_size].cpu()).sum())
    return hits / len(labels)
