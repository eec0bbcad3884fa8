"""The patch layout shared by the nullspace maths and the projection op.

A (B, C, H, W) image is cut into a row-major grid of non-overlapping r_h x r_w patches, each
flattened as (C, r_h, r_w): the layout of the patch-embedding conv weight flattened to
(D, C*r_h*r_w), so ``patchify(x) @ W.reshape(D, -1).T + b`` equals the conv's tokens.
``nsvit_fast.nullspace`` builds on these; ``ops`` owns them so that the dependency points one way.
"""

from __future__ import annotations

import torch

from ..errors import NsvitError


def patchify(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Cut images into flattened patches.

    Args:
        x: images (B, C, H, W); H and W multiples of the patch.
        patch: (r_h, r_w), the patch size.

    Returns:
        (B, P, C*r_h*r_w), P = (H / r_h) * (W / r_w) patches in row-major grid order, each
        flattened as (C, r_h, r_w). At most one copy (the reshape of the permuted view).

    Raises:
        NsvitError: H or W is not a multiple of the patch size.
    """
    b, c, h, w = x.shape
    ph, pw = patch
    if h % ph or w % pw:
        raise NsvitError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
    x = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)


def unpatchify(p: torch.Tensor, chans: int, grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: put flattened patches back into images.

    Args:
        p: patches (B, P, C*r_h*r_w) with P = g_h * g_w, in :func:`patchify`'s layout.
        chans: C, the number of channels.
        grid: (g_h, g_w), patches per column and per row.
        patch: (r_h, r_w), the patch size.

    Returns:
        images (B, C, g_h*r_h, g_w*r_w).
    """
    b = p.shape[0]
    gh, gw = grid
    ph, pw = patch
    x = p.reshape(b, gh, gw, chans, ph, pw).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, chans, gh * ph, gw * pw)
