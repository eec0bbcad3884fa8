"""Batched nullspace projection of image patches, patchify and unpatchify fused (Triton).

For images x (B, C, H, W) cut into non-overlapping r_h x r_w patches p (n = C r_h r_w values,
flattened as (C, r_h, r_w) like the conv weight), and an orthonormal basis Q (k, n):

    keep=True:   p <- Q^T Q p          (projection onto span Q)
    keep=False:  p <- p - Q^T Q p      (projection onto its complement)

Pass whichever of the nullspace and row-space bases is smaller (``PatchNullspace`` does): both
projections are available from either. One program handles ``BLOCK_P`` patches: it reads them
straight from the image layout (no patchify copy), forms the coefficients Q p in chunks of
``BLOCK_K`` basis vectors, and adds Q^T(Q p) back at the same image positions (no unpatchify
copy). Output: a fresh tensor shaped like x. fp32 / fp16 / bf16 (fp32 accumulation: with several
basis chunks and fp16 / bf16 images the partial sums live in an fp32 scratch copy of the images,
and the output is rounded once); fp64 goes to the torch reference. An empty basis (k = 0) gives
zeros (keep) or a copy of x (complement). The op is linear and self-adjoint, so its backward is
the same projection of the incoming gradient. The basis is a constant (no gradient).

Precision of the two ``tl.dot`` products (``DOT_PRECISION``): on sm_80 / sm_90 plain fp32 ``tl.dot``
lowers to TF32 ``mma``, whose 10-bit mantissa breaks the fp32 tolerance (emulated on the test
cases: errors up to 1.2e-3 against atol 1e-5). "tf32x3" (three TF32 products, the split
a = hi + lo) stays on tensor cores and is within 8.5e-8 there, as "ieee" (7.5e-8) is; fp16 / bf16
inputs fit their looser tolerances with plain TF32 (8.2e-4 against atol 1e-2). tests/test_ops.py
re-checks these by emulation for whatever this table says.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch

DOT_PRECISION = {torch.float32: "tf32x3", torch.float16: "tf32", torch.bfloat16: "tf32"}


@triton.jit
def _project_kernel(x_ptr, out_ptr, acc_ptr, q_ptr, total, PER_IMG, GW, C, H, W, RH, RW, n, k, KEEP: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    rmask = rows < total
    img = rows // PER_IMG
    pi = rows % PER_IMG
    # top-left pixel of each patch; int64 image offsets: a batch may pass 2**31 values
    base = img.to(tl.int64) * C * H * W + (pi // GW) * RH * W + (pi % GW) * RW
    ar_n = tl.arange(0, BLOCK_N)
    ar_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, k, BLOCK_K):
        kk = k0 + ar_k
        kmask = kk < k
        coef = tl.zeros((BLOCK_P, BLOCK_K), tl.float32)
        for n0 in range(0, n, BLOCK_N):                                    # coef = p Q_chunk^T
            j = n0 + ar_n
            jmask = j < n
            off = (j // (RH * RW)) * H * W + ((j // RW) % RH) * W + (j % RW)
            xp = tl.load(x_ptr + base[:, None] + off[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0)
            qt = tl.load(q_ptr + kk[None, :] * n + j[:, None], mask=jmask[:, None] & kmask[None, :], other=0.0)
            coef += tl.dot(xp.to(tl.float32), qt.to(tl.float32), input_precision=PRECISION)
        for n0 in range(0, n, BLOCK_N):                                    # out (+)= coef Q_chunk
            j = n0 + ar_n
            jmask = j < n
            off = (j // (RH * RW)) * H * W + ((j // RW) % RH) * W + (j % RW)
            ptrs = base[:, None] + off[None, :]
            m2 = rmask[:, None] & jmask[None, :]
            qc = tl.load(q_ptr + kk[:, None] * n + j[None, :], mask=kmask[:, None] & jmask[None, :], other=0.0)
            proj = tl.dot(coef, qc.to(tl.float32), input_precision=PRECISION)
            if k0 == 0:
                if KEEP:
                    acc = proj
                else:
                    acc = tl.load(x_ptr + ptrs, mask=m2, other=0.0).to(tl.float32) - proj
            else:
                prev = tl.load(acc_ptr + ptrs, mask=m2, other=0.0).to(tl.float32)
                acc = prev + proj if KEEP else prev - proj
            # partial sums stay fp32 (acc_ptr) between basis chunks; out gets the sum rounded once
            if k0 + BLOCK_K >= k:
                tl.store(out_ptr + ptrs, acc, mask=m2)
            else:
                tl.store(acc_ptr + ptrs, acc, mask=m2)


def project_forward(x: torch.Tensor, basis: torch.Tensor, patch: tuple[int, int], keep: bool) -> torch.Tensor:
    """The projection of every patch of ``x`` (B, C, H, W); a fresh tensor like ``x``."""
    x = x.contiguous()
    b, c, h, w = x.shape
    rh, rw = patch
    n, k = c * rh * rw, basis.shape[0]
    if k == 0:  # nothing to project on: the kernel's loop over the basis would leave out unwritten
        return torch.zeros_like(x) if keep else x.clone()
    q = basis.to(device=x.device, dtype=torch.float32).contiguous()
    out = torch.empty_like(x)
    per_img = (h // rh) * (w // rw)
    total = b * per_img
    block_p = 16
    precision = DOT_PRECISION[x.dtype]
    tiles = _tiles(n, k, precision)
    # more than one basis chunk: the partial sums between chunks need an fp32 buffer unless out is
    # fp32 itself (rounded to fp16 / bf16 after every chunk they broke bf16's tolerance at k = 700)
    several = k > tiles["BLOCK_K"]
    acc = torch.empty(x.shape, device=x.device, dtype=torch.float32) if several and x.dtype != torch.float32 else out
    launch(_project_kernel, (triton.cdiv(total, block_p),),
           x, out, acc, q, total, per_img, w // rw, c, h, w, rh, rw, n, k, KEEP=bool(keep), PRECISION=precision,
           BLOCK_P=block_p, **tiles)
    return out


def _tiles(n: int, k: int, precision: str) -> dict:
    """Tile sizes and warps. tf32x3 triples the dot operands: at 64 x 64 tiles with 4 warps ptxas
    spilled (4-16 bytes, sm_80 and sm_90); 32 x 32 tiles with 8 warps compile without spills
    (checked for every launch by nsvit_fast.kernels.aot)."""
    cap, warps = (32, 8) if precision == "tf32x3" else (64, 4)
    return dict(BLOCK_N=max(16, min(triton.next_power_of_2(n), cap)),
                BLOCK_K=max(16, min(triton.next_power_of_2(k), cap)), num_warps=warps)


class NullspaceProject(torch.autograd.Function):
    """Autograd wrapper of :func:`project_forward`: the projection is linear and self-adjoint, so
    backward projects the incoming gradient the same way, through this Function again: so the
    backward is itself differentiable and double backward is exact (a linear op's gradient depends
    on its input only through the incoming gradient). No gradient for the basis."""

    @staticmethod
    def forward(ctx, x, basis, patch, keep):
        """x (B, C, H, W), basis (k, C*r_h*r_w), patch (r_h, r_w), keep -> projected x (fresh)."""
        ctx.save_for_backward(basis)  # saved, not kept: an in-place change before backward is refused
        ctx.patch, ctx.keep = patch, keep
        return project_forward(x, basis, patch, keep)

    @staticmethod
    def backward(ctx, g):
        """The same projection of g (B, C, H, W), differentiable (``create_graph=True`` records it);
        None for basis, patch and keep."""
        basis, = ctx.saved_tensors
        return NullspaceProject.apply(g, basis.detach(), ctx.patch, ctx.keep), None, None, None


def nullspace_project(x, basis, patch, keep):
    """Differentiable batched projection of the patches of x (B, C, H, W) with the orthonormal
    basis (k, n): ``Q^T Q p`` (keep) or ``p - Q^T Q p``; a fresh tensor like x (fp32 / fp16 /
    bf16, fp32 accumulation). CUDA tensors, or CPU ones under the interpreter. Shapes are not
    checked here: ``nsvit_fast.ops.nullspace_project`` checks them."""
    return NullspaceProject.apply(x, basis, tuple(patch), bool(keep))


__all__ = ["nullspace_project", "project_forward", "NullspaceProject", "DOT_PRECISION"]
