"""How much noises move a model: MSE-prob and prediction match rate, forward passes only."""

from __future__ import annotations

import contextlib

import torch

from ..errors import NsvitError
from ..models.base import Adapter
from .cache import CleanCache


@torch.no_grad()
def noise_effect(parts: Adapter, noises: torch.Tensor, clean: CleanCache, max_rows: int = 2048,
                 scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each noise v_m (M, N, D) (times scales[m] if given) over every image of ``clean``:

        mse[m]   = mean_i || softmax(z(u_i + v_m)) - softmax(z(u_i)) ||^2
        match[m] = mean_i [argmax z(u_i + v_m) == argmax z(u_i)]

    Returns (mse (M,), match (M,)) on the noises' device. Chunked so no forward exceeds max_rows.
    Raises NsvitError for noises that are not (M, N, D) with the model's token shape, or a
    max_rows that is not a whole number >= 1 (a negative one returned zeros)."""
    from ..errors import check_count

    max_rows = check_count("max_rows", max_rows)
    if noises.dim() != 3 or tuple(noises.shape[1:]) != parts.token_shape:
        raise NsvitError(f"noises must be (M, {parts.token_shape[0]}, {parts.token_shape[1]}), "
                         f"got {tuple(noises.shape)}")
    m_total = noises.shape[0]
    n = clean.images.shape[0]
    mse = torch.zeros(m_total, device=noises.device)
    match = torch.zeros(m_total, device=noises.device)
    if scales is not None:
        noises = noises * scales.reshape(-1, 1, 1).to(noises)
    img_chunk = min(n, max_rows)
    for i in range(0, n, img_chunk):
        idx = torch.arange(i, min(n, i + img_chunk))
        u, z, p = clean.get(idx)
        b = idx.numel()
        per = max(1, max_rows // b)
        for j in range(0, m_total, per):
            v = noises[j:j + per].to(u)
            with getattr(clean, "autocast", contextlib.nullcontext)():
                zn = parts.encode((u[None] + v[:, None]).reshape(-1, *u.shape[1:]))
            zn = zn.float().reshape(v.shape[0], b, -1)
            mse[j:j + per] += (zn.softmax(-1) - p).pow(2).sum(-1).sum(-1)
            match[j:j + per] += (zn.argmax(-1) == z.argmax(-1)).float().sum(-1)
    return mse / n, match / n
