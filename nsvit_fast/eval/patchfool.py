"""PatchFool (Fu et al., ICLR 2022): an attention-aware adversarial patch for ViTs. No maintained
library implements it, hence this file.

As implemented here (following the paper's sparse-patch setting without its L-inf variant):

1. Patch choice: per image, the ``n_patches`` patch tokens that receive the most attention on the
   clean image (attention probabilities averaged over layers, heads and query tokens).
2. The pixels of those patches are free in [0, 1] (random start); the rest of the image is kept.
3. ``steps`` Adam steps (lr ``lr``) ascend CE(f(x_adv), y) + ``attn_weight`` x the mean attention
   the adversarial patches receive (the attention-aware loss that makes the patch draw the
   model's attention), then clamp to [0, 1].

Defaults: 1 patch, 30 steps, lr 0.2, attn_weight 1.0 (the paper runs 250 steps on ImageNet).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import NsvitError


def patch_mask(parts, idx: torch.Tensor) -> torch.Tensor:
    """(B, k) patch indices -> (B, 1, H, W) float mask of those patches."""
    gh, gw = parts.grid_size
    ph, pw = parts.patch_size
    m = torch.zeros(idx.shape[0], gh * gw, device=idx.device)
    m.scatter_(1, idx, 1.0)
    m = m.reshape(-1, 1, gh, gw)
    return m.repeat_interleave(ph, 2).repeat_interleave(pw, 3)


def patchfool(parts, x: torch.Tensor, y: torch.Tensor, n_patches: int = 1, steps: int = 30, lr: float = 0.2,
              attn_weight: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial images (B, C, H, W) in [0, 1] that differ from x only inside ``n_patches`` patches."""
    if not 1 <= n_patches <= parts.num_patches:
        raise NsvitError(f"n_patches must be in 1..{parts.num_patches}, got {n_patches}")
    p0 = parts.num_prefix_tokens
    with torch.no_grad():
        _, maps = parts.encode_with_attention(parts.patch_embed(x))
        received = torch.stack([m.mean(1).mean(1) for m in maps]).mean(0)[:, p0:]  # (B, N)
        idx = received.topk(n_patches, dim=1).indices
    mask = patch_mask(parts, idx)
    tok = idx + p0
    delta = torch.rand(x.shape, generator=generator).to(x).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr)
    for _ in range(steps):
        x_adv = x * (1 - mask) + delta * mask
        logits, maps = parts.encode_with_attention(parts.patch_embed(x_adv))
        att = torch.stack([m.mean(1).gather(2, tok[:, None, :].expand(-1, m.shape[2], -1)).mean((1, 2))
                           for m in maps]).mean(0)                                     # (B,)
        loss = F.cross_entropy(logits, y) + attn_weight * att.mean()
        opt.zero_grad()
        (-loss).backward()
        opt.step()
        with torch.no_grad():
            delta.clamp_(0, 1)
    return (x * (1 - mask) + delta.detach() * mask).clamp(0, 1)
