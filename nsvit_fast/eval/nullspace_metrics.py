"""Nullspace-specific metrics: prediction match rate and MSE-prob under exact nullspace noise
(pixel space) and under a bank of learned ε-approximate noises (token space)."""

from __future__ import annotations

import torch

from ..errors import NsvitError
from ..nullspace import nullspace_basis
from ..synth.cache import CleanCache
from ..synth.metrics import noise_effect


def _batches(images, batch_size: int, desc: str = "", progress: bool = False):
    """Image batches of a tensor (N, C, H, W) or of an EvalImages (in memory or a streamed folder);
    ``progress``: a per-batch bar on a terminal."""
    from .source import progress_bar

    if isinstance(images, torch.Tensor):
        it = (images[i:i + batch_size] for i in range(0, images.shape[0], batch_size))
    else:
        it = (x for x, _ in images.batches(batch_size))
    return progress_bar(it, -(-len(images) // batch_size), desc, progress)


@torch.no_grad()
def exact_noise_effect(parts, images, scale: float = 10.0, seed: int = 0,
                       batch_size: int = 256, progress: bool = False) -> dict:
    """Exact nullspace noise of norm ``scale`` x each image's norm: match rate, MSE-prob and the
    largest relative logit change, over ``images`` (N, C, H, W) or an EvalImages, batch by batch
    (``progress``: a bar on a terminal). Returns an empty dict for a model with no nullspace."""
    from ..errors import MAX_NOISE_SCALE, check_number

    check_number("scale", scale, lo=0, lo_open=True, hi=MAX_NOISE_SCALE)  # float32 round-off past it
    basis = nullspace_basis(parts)
    if basis.dim == 0:
        return {}
    g = torch.Generator().manual_seed(seed)
    dev = next(parts.parameters()).device
    match = mse = 0.0
    rel = 0.0
    n = 0
    for x in _batches(images, batch_size, "nullspace", progress):
        n += x.shape[0]
        v = basis.sample(x.shape[0], norm=1.0, img_size=tuple(x.shape[-2:]), generator=g, dtype=torch.float64)
        v = (v * scale * x.double().flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)).float()
        z, zn = parts(x.to(dev)), parts((x + v).to(dev))
        match += float((z.argmax(-1) == zn.argmax(-1)).sum())
        mse += float((z.softmax(-1) - zn.softmax(-1)).pow(2).sum(-1).sum())
        rel = max(rel, float((zn - z).abs().max() / z.abs().max()))
    return {"match_rate": match / n, "mse_prob": mse / n, "logits_rel": rel, "nullspace_dim": basis.dim}


def bank_effect(parts, bank, images, batch_size: int = 256, progress: bool = False) -> dict:
    """Match rate and MSE-prob of every noise of a NoiseBank on ``images`` (N, C, H, W) or an
    EvalImages, batch by batch (each batch's clean values computed once; ``progress``: a bar on a
    terminal): mean and per noise."""
    bank.check_model(parts)
    dev = next(parts.parameters()).device
    noises = bank.noises.to(dev)
    mse = torch.zeros(noises.shape[0], device=dev)
    match = torch.zeros(noises.shape[0], device=dev)
    n = 0
    for x in _batches(images, batch_size, "noisebank", progress):
        m, a = noise_effect(parts, noises, CleanCache(parts, x))
        mse += m * x.shape[0]
        match += a * x.shape[0]
        n += x.shape[0]
    mse, match = mse / n, match / n
    if not bool(torch.isfinite(mse).all()):  # the noise overflows this model's forward: no score to report
        i = int((~torch.isfinite(mse)).nonzero()[0])
        raise NsvitError(f"noise {i} of the bank (norm {float(bank.norm[i]):.4g}) overflows {parts.name}'s forward "
                         f"to NaN/inf: it is no ε-nullspace noise of this model")
    return {"match_rate": float(match.mean()), "mse_prob": float(mse.mean()),
            "per_noise_match": match.cpu().tolist(), "per_noise_mse": mse.cpu().tolist()}
