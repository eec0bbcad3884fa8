"""Nullspace-specific metrics: prediction match rate and MSE-prob under exact nullspace noise
(pixel space) and under a bank of learned ε-approximate noises (token space)."""

from __future__ import annotations

import torch

from ..nullspace import nullspace_basis
from ..synth.cache import CleanCache
from ..synth.metrics import noise_effect


@torch.no_grad()
def exact_noise_effect(parts, images: torch.Tensor, scale: float = 10.0, seed: int = 0,
                       batch_size: int = 256) -> dict:
    """Exact nullspace noise of norm ``scale`` x each image's norm: match rate, MSE-prob and the
    largest relative logit change. Returns an empty dict for a model with no nullspace."""
    basis = nullspace_basis(parts)
    if basis.dim == 0:
        return {}
    g = torch.Generator().manual_seed(seed)
    dev = next(parts.parameters()).device
    match = mse = 0.0
    rel = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        v = basis.sample(x.shape[0], norm=1.0, img_size=tuple(x.shape[-2:]), generator=g, dtype=torch.float64)
        v = (v * scale * x.double().flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)).float()
        z, zn = parts(x.to(dev)), parts((x + v).to(dev))
        match += float((z.argmax(-1) == zn.argmax(-1)).sum())
        mse += float((z.softmax(-1) - zn.softmax(-1)).pow(2).sum(-1).sum())
        rel = max(rel, float((zn - z).abs().max() / z.abs().max()))
    n = images.shape[0]
    return {"match_rate": match / n, "mse_prob": mse / n, "logits_rel": rel, "nullspace_dim": basis.dim}


def bank_effect(parts, bank, images: torch.Tensor) -> dict:
    """Match rate and MSE-prob of every noise of a NoiseBank on ``images`` (mean and per noise)."""
    bank.check_model(parts)
    dev = next(parts.parameters()).device
    mse, match = noise_effect(parts, bank.noises.to(dev), CleanCache(parts, images))
    return {"match_rate": float(match.mean()), "mse_prob": float(mse.mean()),
            "per_noise_match": match.cpu().tolist(), "per_noise_mse": mse.cpu().tolist()}
