"""Nullspace noise augmentation, the paper's Algorithm 1 lines 15-20: CE(z, y) + CE(z', y).

Clean and noisy views go through the encoder as one 2B batch: the patch embedding runs once and
the round's noise is broadcast over the batch, instead of the official code's two forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method


def fused_views(parts, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the clean and noisy views, (B, K) each, from one encoder pass over 2B token sets.

    ``x``: images (B, C, H, W) in [0, 1]; ``noise``: one token-space noise (N, D), added to every
    image's patch tokens (cast to their dtype and device). The patch embedding runs once; the
    graph reaches the model's weights through both views."""
    u = parts.patch_embed(x)
    z = parts.encode_noisy(u, noise.to(u)[None], include_clean=True)
    return z[: x.shape[0]], z[x.shape[0]:]


class NS(Method):
    """The paper's method: each round learns one ε-approximate nullspace noise on the current
    model; each step's loss is CE on the clean images plus CE on the same images with that noise
    added to their patch tokens (equal weights)."""

    name = "ns"
    needs_noise = True

    def prepare(self, ctx):
        return ctx.ns_noise()

    def loss(self, parts, x, y, noise):
        z, zn = fused_views(parts, x, noise)
        ce, cen = F.cross_entropy(z, y), F.cross_entropy(zn, y)
        return ce + cen, {"ce_clean": ce.detach(), "ce_noisy": cen.detach()}
