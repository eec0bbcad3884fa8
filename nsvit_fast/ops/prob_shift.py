"""Probability-shift loss: the synthesis objective and its early-stop test in one op.

Defines (paper Alg. 1 lines 8-12, Eq. 7, as the official code computes them):

    loss[m] = mean_b || z_noisy[m, b] - z_clean[b] ||_2            (non-squared L2 of logits)
    mse[m]  = mean_b || softmax(z_noisy[m, b]) - softmax(z_clean[b]) ||_2^2
    stop[m] = mse[m] < eps

Shapes: z_noisy (M, B, K), z_clean (B, K), optional p_clean = softmax(z_clean) (B, K) when the
caller has it cached. Returns loss (M,) with grad to z_noisy, mse (M,) and stop (M,) without.
No host synchronisation: the caller decides when to read ``stop``.
"""

from __future__ import annotations

import torch

from .dispatch import register

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12),
             torch.float16: dict(rtol=1e-2, atol=1e-3), torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}


def prob_shift_torch(z_noisy: torch.Tensor, z_clean: torch.Tensor, eps: float,
                     p_clean: torch.Tensor | None = None):
    """Torch reference: the definition of the op."""
    # vector_norm's backward is 0 at a zero difference, where sqrt(sum(d^2)) would give NaN
    loss = torch.linalg.vector_norm(z_noisy - z_clean, dim=-1).mean(-1)
    with torch.no_grad():
        p_clean = z_clean.softmax(-1) if p_clean is None else p_clean
        mse = (z_noisy.detach().softmax(-1) - p_clean).pow(2).sum(-1).mean(-1)
    return loss, mse, mse < eps


register("prob_shift", "torch", prob_shift_torch)
