"""Token assembly with noise broadcast, fused with the first block's LayerNorm (Triton).

Builds the encoder input for every (noise m, image b) pair, and optionally the clean copies
(the fused 2B batch of NS finetuning), without materialising the broadcast u + v separately:

    rows r = [clean b = 0..B-1 (if include_clean)] + [noise m, image b for m < M, b < B]
    x[r]   = [prefix tokens, u[b] + v[m]] + pos          (pos over prefix and patches, or patches only)
    ln[r]  = LayerNorm(x[r]) with the first block's weight, bias and eps

Shapes: u (B, N, D); v (M, N, D) (M may be 0 with include_clean); prefix (P, D) (P may be 0);
pos (P + N, D) if ``embed_prefix`` else (N, D); weight, bias (D,) or None (ones, zeros). Returns
x, ln (R, P + N, D), R = B * include_clean + M * B, in the dtype the torch reference gives: u, v,
prefix and pos promoted (fp32 for bf16 u, v and fp32 prefix, pos under autocast: the fp32
residual stream timm keeps). fp32 accumulation; the LayerNorm statistics are those of x as stored
(rounded), which backward reads back. Gradients come back in each input's own dtype. One program
per token row; D must fit one block (D <= 8192). All tensors on one device.

Backward: one program per row turns (grad x, grad ln) into the total gradient g of x (LayerNorm
backward inline, per-row partials of the weight and bias gradients); then row-sum programs reduce
g into grad u (over noises and the clean copy), grad v_m (over the batch, inside the kernel),
grad pos and grad prefix (over all rows). Only the gradients autograd asks for are computed: with
a frozen LayerNorm the per-row weight and bias partials (R T D fp32 each, ~0.9 GB apiece at
ViT-B/16 with 8 noises and a batch of 32) are neither allocated nor written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import NsvitError
from ..ops._autograd import links, once_differentiable
from . import launch

MAX_D = 8192


@triton.jit
def _assemble_fwd(u_ptr, v_ptr, pre_ptr, pos_ptr, w_ptr, b_ptr, x_ptr, ln_ptr, mean_ptr, rstd_ptr,
                  B, N, P, D, CLEAN_B, eps, EMBED_PREFIX: tl.constexpr, ROUND_UV: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # token row = r * T + t; int64: row * D passes 2**31 at large R
    T = P + N
    r = row // T
    t = row % T
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    is_pre = t < P
    i = tl.maximum(t - P, 0)
    noisy = r >= CLEAN_B
    rr = tl.maximum(r - CLEAN_B, 0)
    m = rr // B
    b = tl.where(noisy, rr % B, r)
    x = tl.load(pre_ptr + t * D + d, mask=dm & is_pre, other=0.0).to(tl.float32)
    uv = tl.load(u_ptr + (b * N + i) * D + d, mask=dm & (t >= P), other=0.0).to(tl.float32)
    uv += tl.load(v_ptr + (m * N + i) * D + d, mask=dm & (t >= P) & noisy, other=0.0).to(tl.float32)
    if ROUND_UV:  # the reference adds fp16 / bf16 u and v in their dtype before pos: round as it does
        uv = uv.to(u_ptr.dtype.element_ty).to(tl.float32)  # round to nearest even on a GPU
    x += uv
    if EMBED_PREFIX:
        x += tl.load(pos_ptr + t * D + d, mask=dm, other=0.0).to(tl.float32)
    else:
        x += tl.load(pos_ptr + i * D + d, mask=dm & (t >= P), other=0.0).to(tl.float32)
    # x is stored in x's dtype and backward recomputes xhat from that: the statistics (and ln) are
    # those of the rounded x, so forward and backward agree for fp16 / bf16 x
    x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(dm, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    w = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
    bb = tl.load(b_ptr + d, mask=dm, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * D + d, x, mask=dm)
    tl.store(ln_ptr + row * D + d, xc * rstd * w + bb, mask=dm)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _assemble_bwd_rows(gx_ptr, gln_ptr, x_ptr, mean_ptr, rstd_ptr, w_ptr, g_ptr, dw_ptr, db_ptr, D,
                       WANT_WB: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    x = tl.load(x_ptr + row * D + d, mask=dm, other=0.0).to(tl.float32)
    gy = tl.load(gln_ptr + row * D + d, mask=dm, other=0.0).to(tl.float32)
    gx = tl.load(gx_ptr + row * D + d, mask=dm, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(dm, (x - mean) * rstd, 0.0)
    wg = tl.where(dm, w * gy, 0.0)
    c1 = tl.sum(wg, axis=0) / D
    c2 = tl.sum(wg * xhat, axis=0) / D
    g = gx + rstd * (wg - c1 - xhat * c2)
    tl.store(g_ptr + row * D + d, g, mask=dm)
    if WANT_WB:  # per-row partials of the LayerNorm weight and bias gradients
        tl.store(dw_ptr + row * D + d, gy * xhat, mask=dm)
        tl.store(db_ptr + row * D + d, gy, mask=dm)


@triton.jit
def _sum_rows(g_ptr, out_ptr, start, inner_stride, count, outer_stride, D, BLOCK_D: tl.constexpr):
    """out[o] = sum_{j < count} g[start + o * outer_stride + j * inner_stride] (rows of D values)."""
    o = tl.program_id(0).to(tl.int64)  # int64 offsets: rows * D may pass 2**31
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    first = start + o * outer_stride
    for j in range(0, count):
        acc += tl.load(g_ptr + (first + j * inner_stride) * D + d, mask=dm, other=0.0)
    tl.store(out_ptr + o * D + d, acc, mask=dm)


@triton.jit
def _grad_u_kernel(g_ptr, out_ptr, B, N, T, P, M, CLEAN_B, D, BLOCK_D: tl.constexpr):
    """grad u[b, i] = g[clean row b] (if clean copies) + sum_m g[noise m, image b], token P + i."""
    o = tl.program_id(0).to(tl.int64)
    b = o // N
    i = o % N
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    acc = tl.load(g_ptr + (b * T + P + i) * D + d, mask=dm & (CLEAN_B > 0), other=0.0)
    for mm in range(0, M):
        acc += tl.load(g_ptr + ((CLEAN_B + mm * B + b) * T + P + i) * D + d, mask=dm, other=0.0)
    tl.store(out_ptr + o * D + d, acc, mask=dm)


@triton.jit
def _grad_v_kernel(g_ptr, out_ptr, B, N, T, P, CLEAN_B, D, BLOCK_D: tl.constexpr):
    """grad v[m, i] = sum_b g[noise m, image b], token P + i: the batch reduction of the broadcast."""
    o = tl.program_id(0).to(tl.int64)
    mm = o // N
    i = o % N
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for b in range(0, B):
        acc += tl.load(g_ptr + ((CLEAN_B + mm * B + b) * T + P + i) * D + d, mask=dm, other=0.0)
    tl.store(out_ptr + o * D + d, acc, mask=dm)


def _sum(g, start, inner, count, outer, n_out, d, block_d, dtype):
    if not count:
        return torch.zeros(n_out, d, device=g.device, dtype=dtype)
    out = torch.empty(n_out, d, device=g.device, dtype=torch.float32)
    launch(_sum_rows, (n_out,), g, out, start, inner, count, outer, d, BLOCK_D=block_d)
    return out.to(dtype)


class TokenAssembly(torch.autograd.Function):
    """Autograd wrapper of the fused assembly + LayerNorm (module docstring for the rows and the
    backward's reductions). Once differentiable: the kernels' gradients are constants to autograd,
    so a second derivative raises (``nsvit_fast.ops._autograd``) instead of coming out wrong."""

    @staticmethod
    def forward(ctx, u, v, prefix, pos, weight, bias, eps, embed_prefix, include_clean):
        """Launch the forward; returns x, ln (R, P + N, D) in the promoted dtype of the tensors
        the reference adds (u, v, prefix, pos: fp32 for bf16 u, v under autocast) and saves x with
        the per-row LayerNorm mean and rstd (fp32) for backward. weight / bias None: ones / zeros."""
        # the gradients depend on these: double backward raises. Taken before .contiguous(), whose
        # copy (of timm's transposed patch tokens) would not require grad under forward's no_grad
        ctx.links = links(u, v, prefix, pos, weight)
        u = u.contiguous()
        bsz, n, d = u.shape
        # one program holds a whole row. ptxas for sm_90 (kernels.aot): at D 16384 the forward spills
        # 11 KB per thread, at 8192 108 B, at 4096 nothing (ViT-22B's D is 6144)
        if d > MAX_D:
            raise NsvitError(f"token_assembly (triton): token width D = {d} is over {MAX_D}, the widest row one "
                             f"program holds; use backend='torch' (or NSVIT_BACKEND=token_assembly=torch)")
        m = 0 if v is None else v.shape[0]
        p = prefix.shape[0]
        t = p + n
        clean_b = bsz if include_clean else 0
        r = clean_b + m * bsz
        dev = u.device
        # the reference's dtype (cat and + pos promote): timm keeps the fp32 residual stream when
        # autocast runs the patch embedding in bf16; a v or prefix it never reads does not count
        dtype = torch.promote_types(u.dtype, pos.dtype)
        for extra in (v if m else None, prefix if p else None):
            dtype = dtype if extra is None else torch.promote_types(dtype, extra.dtype)
        vv = (v if v is not None else u.new_zeros(1, n, d)).contiguous()
        pre = (prefix if p else u.new_zeros(1, d)).contiguous()
        w = (weight if weight is not None else torch.ones(d, device=dev, dtype=dtype)).contiguous()
        bb = (bias if bias is not None else torch.zeros(d, device=dev, dtype=dtype)).contiguous()
        x = torch.empty(r, t, d, device=dev, dtype=dtype)
        ln = torch.empty_like(x)
        mean = torch.empty(r * t, device=dev, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block_d = triton.next_power_of_2(d)
        # u + v rounded to their dtype where it is fp16 / bf16 (the reference's add; both then that dtype)
        round_uv = bool(m) and torch.promote_types(u.dtype, vv.dtype) in (torch.float16, torch.bfloat16)
        launch(_assemble_fwd, (r * t,), u, vv, pre, pos.contiguous(), w, bb, x, ln,
               mean, rstd, bsz, n, p, d, clean_b, float(eps), EMBED_PREFIX=bool(embed_prefix), ROUND_UV=round_uv,
               BLOCK_D=block_d)
        ctx.save_for_backward(x, mean, rstd, w)
        ctx.meta = (bsz, n, d, m, p, clean_b, bool(embed_prefix), block_d, v is not None)
        ctx.dtypes = (u.dtype, None if v is None else v.dtype, prefix.dtype, pos.dtype, bb.dtype)
        return x, ln

    @staticmethod
    @once_differentiable
    def backward(ctx, gx, gln):
        """Gradients for u, v, prefix, pos, weight and bias (None where autograd does not ask, and
        for the non-tensor arguments); a missing incoming gradient counts as zeros."""
        x, mean, rstd, weight = ctx.saved_tensors
        bsz, n, d, m, p, clean_b, embed_prefix, block_d, has_v = ctx.meta
        u_dtype, v_dtype, pre_dtype, pos_dtype, bias_dtype = ctx.dtypes
        r, t = x.shape[0], p + n
        gx = torch.zeros_like(x) if gx is None else gx.contiguous()
        gln = torch.zeros_like(x) if gln is None else gln.contiguous()
        need = ctx.needs_input_grad
        want_wb = bool(need[4] or need[5])
        g = torch.empty(r * t, d, device=x.device, dtype=torch.float32)
        dw = torch.empty_like(g) if want_wb else g  # unused (not written) when the LayerNorm is frozen
        db = torch.empty_like(g) if want_wb else g
        launch(_assemble_bwd_rows, (r * t,), gx, gln, x, mean, rstd, weight, g, dw, db, d,
               WANT_WB=want_wb, BLOCK_D=block_d)
        gu = gv = gpre = gpos = gw = gb = None
        if need[0]:  # over the noises, plus the clean copy
            gu = torch.empty(bsz, n, d, device=x.device, dtype=torch.float32)
            launch(_grad_u_kernel, (bsz * n,), g, gu, bsz, n, t, p, m, clean_b, d, BLOCK_D=block_d)
            gu = gu.to(u_dtype)  # each gradient in its own input's dtype (x's may be promoted)
        if has_v and need[1] and m:  # over the batch, inside the kernel
            gv = torch.empty(m, n, d, device=x.device, dtype=torch.float32)
            launch(_grad_v_kernel, (m * n,), g, gv, bsz, n, t, p, clean_b, d, BLOCK_D=block_d)
            gv = gv.to(v_dtype)
        if need[2] and p:
            gpre = _sum(g, 0, t, r, 1, p, d, block_d, pre_dtype)
        if need[3]:
            gpos = _sum(g, 0 if embed_prefix else p, t, r, 1, t if embed_prefix else n, d, block_d, pos_dtype)
        if need[4]:
            gw = dw.sum(0).to(weight.dtype)
        if need[5]:
            gb = db.sum(0).to(bias_dtype)
        return gu, gv, gpre, gpos, gw, gb, None, None, None


def token_assembly(u, v, prefix, pos, weight, bias, eps, embed_prefix=True, include_clean=False):
    """Differentiable fused token assembly (module docstring): u (B, N, D), v (M, N, D) or None,
    prefix (P, D), pos (P + N, D) or (N, D), weight / bias (D,) or None -> x, ln (R, P + N, D) in
    the promoted dtype of u, v, prefix, pos. Shapes are not checked; D over MAX_D (8192) raises NsvitError
    (``nsvit_fast.ops.token_assembly`` sends those rows to the torch reference instead)."""
    return TokenAssembly.apply(u, v, prefix, pos, weight, bias, eps, embed_prefix, include_clean)


__all__ = ["token_assembly", "TokenAssembly"]
