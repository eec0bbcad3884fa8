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


@torch.no_grad()
def scale_to_eps(parts: Adapter, noise: torch.Tensor, clean: CleanCache, eps: float, *, low: float = 0.9,
                 iters: int = 40, max_rows: int = 2048, max_scale: float = 1e6) -> tuple[float, float]:
    """The scale s that puts one noise (N, D) just inside ε on ``clean``'s images: MSE-prob(s v) in
    [``low`` ε, ε), in forward passes only (at most ``iters``): a bracket in x4 steps from
    s = min(1, ``max_scale``), then bisection of log s. Returns (s, MSE-prob at s), s the largest
    scale seen inside ε.

    Where that band is not reached, the largest scale seen inside ε comes back with a warning: a
    noise whose MSE-prob stays under ``low`` ε up to ``max_scale`` (ε near MSE-prob's ceiling of 2),
    or ``iters`` spent. Raises NsvitError for a noise that is not (N, D) of the model's tokens or is
    all zeros, ε <= 0, ``low`` outside (0, 1], ``iters`` < 1, ``max_scale`` <= 0, a model whose
    outputs are not finite, or no scale down to 1e-12 inside ε. Under torchrun each MSE-prob is
    averaged over the ranks, so every rank takes the same search steps and returns the same scale."""
    from ..errors import check_count

    if noise.dim() != 2 or tuple(noise.shape) != parts.token_shape:
        raise NsvitError(f"noise must be {parts.token_shape}, got {tuple(noise.shape)}")
    if not float(noise.abs().max()) > 0:
        raise NsvitError("an all-zero noise has no scale at which it reaches ε")
    if not float(eps) > 0:
        raise NsvitError(f"eps must be > 0, got {eps}")
    if not 0 < float(low) <= 1:
        raise NsvitError(f"low must be in (0, 1], got {low}")
    if not float(max_scale) > 0:
        raise NsvitError(f"max_scale must be > 0, got {max_scale}")
    iters = check_count("iters", iters)
    v = noise[None]

    from ..distributed import all_mean, rank_world

    world = rank_world()[1]

    def mse_at(s: float) -> float:
        e = noise_effect(parts, v, clean, max_rows, scales=torch.full((1,), s))[0][:1]
        if world > 1:  # under torchrun every rank takes the search's steps on the same (averaged) number
            e = all_mean(e.float().clone())
        e = float(e[0])
        if e != e:
            raise NsvitError(f"MSE-prob is NaN at scale {s:g}: the model's outputs are not finite")
        return e

    lo, hi, best = 0.0, None, (0.0, 0.0)  # lo/hi: largest scale inside ε, smallest outside
    s = min(1.0, float(max_scale))
    for _ in range(iters):
        e = mse_at(s)
        if e < eps:
            lo, best = s, (s, e)
            if e >= low * eps:
                return best
        else:
            hi = s
        if hi is None:
            if s >= max_scale:
                break
            s = min(s * 4, max_scale)
        elif lo == 0.0:
            if s <= 1e-12:
                break
            s = s / 4
        else:
            s = (lo * hi) ** 0.5
    if best[0] == 0.0:
        raise NsvitError(f"no scale down to {s:g} keeps this noise inside eps {eps}")
    import warnings

    warnings.warn(f"scale_to_eps: MSE-prob {best[1]:.4g} at scale {best[0]:.4g}, under {low} x eps {eps} "
                  + ("(the largest scale allowed)" if best[0] >= max_scale else f"after {iters} forward(s)"),
                  stacklevel=2)
    return best
