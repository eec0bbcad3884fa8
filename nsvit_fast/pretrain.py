"""Train the embedded digits ViT from scratch: the "pretrained" model the demo and tests start from.

Recipe (tuned on this 2-core CPU): AdamW lr 2e-3, weight decay 0.05, batch 64, linear warmup then
cosine decay, label smoothing 0.1, random affine augmentation (rotation 10 deg, shift 10%, scale
0.9-1.1). The checkpoint with the best validation accuracy is kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import digits
from .errors import check_positive
from .eval.accuracy import accuracy
from .models import create_model, embedded, save_model
from .models.base import Adapter


@dataclass
class PretrainConfig:
    """The recipe of ``pretrain_digits`` (see the module docstring); epochs and lr must be > 0."""

    epochs: int = 60
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    augment: bool = True
    seed: int = 0


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per-sample random affine (rotation, shift, scale) in one grid_sample call."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=g) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(b, generator=g)
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * 0.2  # 10% of the side, in [-1, 1] units
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0, 1)


def pretrain_digits(cfg: PretrainConfig = PretrainConfig(), out: str | Path | None = None,
                    progress: bool = True) -> tuple[Adapter, dict]:
    """Train ``digits_vit`` from random init; return (the adapter with the best validation epoch's
    weights, metrics: val_acc, test_acc, train_seconds, config, threads). Saves to ``out`` if given.

    Raises:
        NsvitError: epochs or lr not > 0."""
    from tqdm.auto import tqdm

    check_positive("epochs", cfg.epochs)
    check_positive("lr", cfg.lr)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    tr, va, te = digits("train"), digits("val"), digits("test")
    parts = create_model(embedded.ARCH, name=embedded.NAME, mean=embedded.MEAN, std=embedded.STD, **embedded.KWARGS)
    opt = torch.optim.AdamW(parts.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    best, best_state, t0 = -1.0, None, time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc="pretrain digits_vit", disable=None if progress else True)
    for _ in bar:
        parts.train()
        perm = torch.randperm(len(tr), generator=g)
        for i in range(0, len(tr), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x, y = tr.images[idx], tr.labels[idx]
            if cfg.augment:
                x = _augment(x, g)
            loss = F.cross_entropy(parts(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(parts, va.images, va.labels)
        if acc >= best:
            best, best_state = acc, {k: v.clone() for k, v in parts.weights().items()}
        bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{acc:.3f}", best=f"{best:.3f}")
    parts.load_weights(best_state, "the best epoch's weights")
    parts.eval()
    metrics = {"val_acc": best, "test_acc": accuracy(parts, te.images, te.labels),
               "train_seconds": round(time.perf_counter() - t0, 1), "config": asdict(cfg),
               "threads": torch.get_num_threads()}
    if out is not None:
        save_model(parts, out, {"trained_by": "nsvit-fast pretrain", "metrics": metrics})
    return parts, metrics


__all__ = ["PretrainConfig", "pretrain_digits"]
