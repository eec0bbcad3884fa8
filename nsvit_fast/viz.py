"""Figures (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path

import torch

from .io import save_figure


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); every figure goes through this."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(ax, img: torch.Tensor, title: str) -> None:
    ax.imshow(img.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def nullspace_noise_figure(images: torch.Tensor, noise: torch.Tensor, clean_probs: torch.Tensor,
                           noisy_probs: torch.Tensor, path: str | Path, classes=None) -> Path:
    """The paper's Fig. 2: image, nullspace noise, noisy image, with predictions, one row per image.

    The noise and the noisy image leave [0, 1], so they are shown rescaled: noise as
    0.5 + v / (2 max|v|), the noisy image min-max scaled."""
    plt = pyplot()
    n = images.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(6, 2.1 * n), squeeze=False)
    for i in range(n):
        x, v = images[i], noise[i]
        pc, pn = clean_probs[i], noisy_probs[i]
        lc, ln = int(pc.argmax()), int(noisy_probs[i].argmax())
        name = (lambda k: classes[k] if classes else str(k))
        _show(axes[i, 0], x, f"image: {name(lc)} ({pc[lc]:.3f})")
        _show(axes[i, 1], 0.5 + v / (2 * v.abs().max()), f"noise, |v|/|x| = {v.norm() / x.norm():.0f}")
        xn = x + v
        _show(axes[i, 2], (xn - xn.min()) / (xn.max() - xn.min()), f"noisy: {name(ln)} ({pn[ln]:.3f})")
    fig.suptitle("Exact patch-embedding nullspace noise (noise and noisy image rescaled for display)",
                 fontsize=8)
    fig.tight_layout()
    out = save_figure(fig, path, dpi=120)
    plt.close(fig)
    return out


def bars_figure(rows: list[dict], metrics: list[tuple[str, str]], path: str | Path, title: str = "") -> Path:
    """Grouped bars: one group per metric (key, label), one bar per row (row["name"])."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(metrics), 3.4))
    w = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * w for j in range(len(metrics))]
        ax.bar(xs, [r.get(k, 0.0) for k, _ in metrics], width=w, label=r["name"],
               yerr=[r.get(k + "_std", 0.0) for k, _ in metrics] if any(k + "_std" in r for k, _ in metrics) else None)
    ax.set_xticks(range(len(metrics)), [lab for _, lab in metrics], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, len(rows)))
    fig.tight_layout()
    out = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return out


def image_grid(rows: list[list[tuple[torch.Tensor, str]]], path: str | Path, title: str = "",
               cmap_rows: set[int] | None = None) -> Path:
    """A grid of panels: rows of (image (3, H, W) or map (h, w), caption); maps drawn with a colormap."""
    plt = pyplot()
    nr, nc = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(nr, nc, figsize=(2.3 * nc, 2.3 * nr), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(nc):
            ax = axes[i, j]
            ax.axis("off")
            if j >= len(row):
                continue
            img, cap = row[j]
            img = img.detach().cpu().float()
            if img.dim() == 2:
                ax.imshow(img.numpy(), cmap="inferno", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_title(cap, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    out = save_figure(fig, path, dpi=110)
    plt.close(fig)
    return out


__all__ = ["pyplot", "nullspace_noise_figure", "bars_figure", "image_grid"]
