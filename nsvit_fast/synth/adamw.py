"""AdamW for a bank of noises, updated only where a mask allows, with the cosine learning rate.

Hand-written (not torch.optim.AdamW) because each noise must stop on its own without a host
sync: a finished noise keeps its value and state through ``torch.where`` while the others move.
It follows torch's AdamW arithmetic step by step, so one noise takes the same trajectory as
``torch.optim.AdamW`` + ``CosineAnnealingLR`` (tested).
"""

from __future__ import annotations

import math

import torch


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """CosineAnnealingLR's closed form (eta_min 0): the rate for the update at 0-based ``step``."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


class MaskedAdamW:
    """AdamW state (first and second moments, zeros) for a tensor of ``shape`` on ``device``;
    :meth:`step` updates selected rows of the caller's tensor in place. ``lr`` is kept for the
    caller; each step takes its own rate (see :func:`cosine_lr`)."""

    def __init__(self, shape, device, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999),
                 eps: float = 1e-8, dtype=torch.float32):
        self.lr, self.wd, self.betas, self.eps = lr, weight_decay, betas, eps
        self.m = torch.zeros(shape, device=device, dtype=dtype)
        self.s = torch.zeros(shape, device=device, dtype=dtype)

    @torch.no_grad()
    def step(self, v: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, move: torch.Tensor, t: int,
             lr: float) -> None:
        """Update ``v[rows]`` in place with gradient ``g`` (len(rows), ...) where ``move`` (len(rows),)
        is True. ``t`` is the 1-based AdamW step count shared by the moving rows."""
        b1, b2 = self.betas
        p, m, s = v[rows], self.m[rows], self.s[rows]
        p_new = p * (1 - lr * self.wd)
        m_new = torch.lerp(m, g, 1 - b1)
        s_new = s * b2 + (1 - b2) * g * g
        denom = (s_new.sqrt() / math.sqrt(1 - b2 ** t)).add_(self.eps)
        p_new = p_new - (lr / (1 - b1 ** t)) * m_new / denom
        keep = move.reshape(-1, *([1] * (v.dim() - 1)))
        v[rows] = torch.where(keep, p_new, p)
        self.m[rows] = torch.where(keep, m_new, m)
        self.s[rows] = torch.where(keep, s_new, s)
