"""Token assembly with noise broadcast and the first block's LayerNorm: the encoder input for
every (noise m, image b) pair (and optionally the clean copies), and its LayerNorm.

    x[r] = [prefix, u[b] + v[m]] + pos,  ln[r] = LayerNorm(x[r]; weight, bias, eps)
    rows r: clean b (if include_clean), then noise-major (m, b)

Shapes: u (B, N, D), v (M, N, D) or None, prefix (P, D), pos (P + N, D) if embed_prefix else
(N, D), weight/bias (D,) or None. Returns x, ln (R, P + N, D) in the promoted dtype of u, v,
prefix and pos (the Triton backend matches it; gradients in each input's dtype). The torch
reference follows timm's own ``_pos_embed`` order of operations, so with the torch backend the
encoder output is exactly ``model(x)``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backends import triton_ok
from .dispatch import register

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12),
             torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def token_assembly_torch(u, v, prefix, pos, weight, bias, eps, embed_prefix=True, include_clean=False):
    """Torch reference, the definition of the op (arguments and results as
    :func:`nsvit_fast.ops.token_assembly`): a cat, an add and ``F.layer_norm`` in timm's order."""
    b, n, d = u.shape
    parts = [u] if include_clean else []
    if v is not None and v.shape[0]:
        parts.append((u[None] + v[:, None]).reshape(-1, n, d))
    rows = torch.cat(parts) if len(parts) > 1 else parts[0]
    r, p = rows.shape[0], prefix.shape[0]
    if embed_prefix:
        x = (torch.cat([prefix.expand(r, p, d), rows], 1) if p else rows) + pos
    else:
        x = torch.cat([prefix.expand(r, p, d), rows + pos], 1) if p else rows + pos
    return x, F.layer_norm(x, (d,), weight, bias, eps)


def token_assembly_triton(u, v, prefix, pos, weight, bias, eps, embed_prefix=True, include_clean=False):
    """The Triton backend (``nsvit_fast.kernels.token_assembly``): the same results without
    materialising the broadcast u + v, LayerNorm fused. float64, and rows wider than one block
    (D over ``MAX_D``, 8192), go to the torch reference."""
    from ..kernels.token_assembly import MAX_D, token_assembly

    if u.shape[-1] > MAX_D or any(t is not None and t.dtype == torch.float64
                                  for t in (u, v, prefix, pos, weight, bias)):
        # the kernel computes in fp32 and holds a row in one block: the reference, as for the other ops
        return token_assembly_torch(u, v, prefix, pos, weight, bias, eps, embed_prefix, include_clean)

    return token_assembly(u, v, prefix, pos, weight, bias, eps, embed_prefix, include_clean)


register("token_assembly", "torch", token_assembly_torch, tolerance=TOLERANCE)
# no C++ version: on the CPU the reference is a cat, an add and torch's LayerNorm, nothing to fuse away
register("token_assembly", "triton", token_assembly_triton, triton_ok, prefer_on=("cuda",))
