"""Probability-shift loss with a device-side stop flag (Triton).

Computes, for noisy logits ``z_noisy`` (M, B, K) against clean logits ``z_clean`` (B, K):

    loss[m] = mean_b ||z_noisy[m, b] - z_clean[b]||_2
    mse[m]  = mean_b ||softmax(z_noisy[m, b]) - softmax(z_clean[b])||_2^2
    stop[m] = mse[m] < eps

in two launches: one program per (m, b) row (online softmax over K in blocks, the logit distance,
the squared probability shift, and the row's gradient of ``loss`` w.r.t. ``z_noisy``), then one
program per m summing its B rows in a fixed order (deterministic) and writing loss, mse and stop.
Nothing is read back to the host.

Shapes and dtypes: fp32, fp16 or bf16 inputs, accumulated in fp32; outputs loss, mse fp32 (M,),
stop bool (M,). Inputs are made contiguous. Writes: only fresh output tensors. Gradient flows to
``z_noisy`` only; ``z_clean`` (and ``p_clean`` if given) are constants. The caller decides when to
read ``stop`` (that is where the host syncs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._autograd import links, once_differentiable
from . import launch


@triton.jit
def _load_block(zn_row, zc_row, k0, offs, K):
    # one BLOCK_K block of a (noisy, clean) row pair in fp32, zeros past K; both passes read rows so
    k = k0 + offs
    mask = k < K
    xn = tl.load(zn_row + k, mask=mask, other=0.0).to(tl.float32)
    xc = tl.load(zc_row + k, mask=mask, other=0.0).to(tl.float32)
    return k, mask, xn, xc


@triton.jit
def _rows_kernel(zn_ptr, zc_ptr, pc_ptr, dist_ptr, sq_ptr, grad_ptr, B, K, inv_b,
                 HAS_PC: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row = m * B + b; int64: row * K passes 2**31 at large M B K
    b = row % B
    zn_row = zn_ptr + row * K
    zc_row = zc_ptr + b * K
    offs = tl.arange(0, BLOCK_K)
    # pass 1: online max / sum-exp of both rows, and the squared logit distance
    m_n = tl.full((), -float("inf"), tl.float32)
    s_n = tl.zeros((), tl.float32)
    m_c = tl.full((), -float("inf"), tl.float32)
    s_c = tl.zeros((), tl.float32)
    d2 = tl.zeros((), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k, mask, xn, xc = _load_block(zn_row, zc_row, k0, offs, K)
        diff = xn - xc
        d2 += tl.sum(diff * diff, axis=0)
        # while every logit so far is -inf, exp(-inf - -inf) is NaN: subtract 0 instead (exp(-inf) = 0)
        new_n = tl.maximum(m_n, tl.max(tl.where(mask, xn, -float("inf")), axis=0))
        at_n = tl.where(new_n == -float("inf"), 0.0, new_n)
        s_n = s_n * tl.exp(m_n - at_n) + tl.sum(tl.where(mask, tl.exp(xn - at_n), 0.0), axis=0)
        m_n = new_n
        new_c = tl.maximum(m_c, tl.max(tl.where(mask, xc, -float("inf")), axis=0))
        at_c = tl.where(new_c == -float("inf"), 0.0, new_c)
        s_c = s_c * tl.exp(m_c - at_c) + tl.sum(tl.where(mask, tl.exp(xc - at_c), 0.0), axis=0)
        m_c = new_c
    dist = tl.sqrt(d2)
    # the gradient of ||d|| is d / ||d||, and 0 where d = 0 (as torch.linalg.vector_norm)
    scale = tl.where((dist > 0) | (dist != dist), inv_b / dist, 0.0)  # a NaN row stays NaN, as the reference
    # pass 2: squared probability shift, and the gradient row
    sq = tl.zeros((), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k, mask, xn, xc = _load_block(zn_row, zc_row, k0, offs, K)
        pn = tl.exp(xn - m_n) / s_n
        if HAS_PC:
            pc = tl.load(pc_ptr + b * K + k, mask=mask, other=0.0).to(tl.float32)
        else:
            pc = tl.exp(xc - m_c) / s_c
        dp = tl.where(mask, pn - pc, 0.0)
        sq += tl.sum(dp * dp, axis=0)
        tl.store(grad_ptr + row * K + k, (xn - xc) * scale, mask=mask)
    tl.store(dist_ptr + row, dist)
    tl.store(sq_ptr + row, sq)


@triton.jit
def _reduce_kernel(dist_ptr, sq_ptr, loss_ptr, mse_ptr, stop_ptr, B, inv_b, eps, BLOCK_B: tl.constexpr):
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK_B)
    acc_d = tl.zeros((), tl.float32)
    acc_s = tl.zeros((), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bb = b0 + offs
        mask = bb < B
        acc_d += tl.sum(tl.load(dist_ptr + m * B + bb, mask=mask, other=0.0), axis=0)
        acc_s += tl.sum(tl.load(sq_ptr + m * B + bb, mask=mask, other=0.0), axis=0)
    mse = acc_s * inv_b
    tl.store(loss_ptr + m, acc_d * inv_b)
    tl.store(mse_ptr + m, mse)
    tl.store(stop_ptr + m, (mse < eps).to(tl.int8))


def prob_shift_forward(z_noisy: torch.Tensor, z_clean: torch.Tensor, eps: float, p_clean: torch.Tensor | None = None):
    """Raw launches: (loss (M,), mse (M,), stop (M,) bool, grad (M, B, K) fp32 of loss.sum())."""
    zn, zc = z_noisy.contiguous(), z_clean.contiguous()
    m, b, k = zn.shape
    dev = zn.device
    dist = torch.empty(m * b, device=dev, dtype=torch.float32)
    sq = torch.empty_like(dist)
    grad = torch.empty(m, b, k, device=dev, dtype=torch.float32)
    pc = p_clean.contiguous() if p_clean is not None else zc
    # an empty batch launches no rows; its means are NaN, as torch's mean over nothing
    inv_b = 1.0 / b if b else float("nan")
    block_k = min(triton.next_power_of_2(max(k, 1)), 1024)
    launch(_rows_kernel, (m * b,), zn, zc, pc, dist, sq, grad, b, k, inv_b, HAS_PC=p_clean is not None,
           BLOCK_K=block_k)
    loss = torch.empty(m, device=dev, dtype=torch.float32)
    mse = torch.empty_like(loss)
    stop = torch.empty(m, device=dev, dtype=torch.int8)
    launch(_reduce_kernel, (m,), dist, sq, loss, mse, stop, b, inv_b, float(eps),
           BLOCK_B=min(triton.next_power_of_2(max(b, 1)), 1024))
    return loss, mse, stop.bool(), grad


class ProbShift(torch.autograd.Function):
    """Autograd wrapper: forward as :func:`prob_shift_forward`; backward scales the saved gradient
    rows by the incoming gradient of each noise's loss. Once differentiable: the rows are constants
    to autograd (their dependence on z_noisy is invisible), so a second derivative raises
    (``nsvit_fast.ops._autograd``) instead of leaving out the Hessian of the distance."""

    @staticmethod
    def forward(ctx, z_noisy, z_clean, eps, p_clean=None):
        """(M, B, K), (B, K), eps, optional (B, K) -> loss, mse (M,) fp32, stop (M,) bool; saves
        the (M, B, K) fp32 gradient rows for backward."""
        loss, mse, stop, grad = prob_shift_forward(z_noisy, z_clean, eps, p_clean)
        ctx.save_for_backward(grad)
        ctx.links = links(z_noisy)  # the rows depend on z_noisy: a double backward through them raises
        ctx.in_dtype = z_noisy.dtype
        ctx.mark_non_differentiable(mse, stop)
        return loss, mse, stop

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_mse, g_stop):
        """Gradient w.r.t. z_noisy (M, B, K) in its dtype: the saved rows times g_loss[m]; None for
        the constants."""
        (grad,) = ctx.saved_tensors
        return (grad * g_loss.reshape(-1, 1, 1)).to(ctx.in_dtype), None, None, None


def prob_shift(z_noisy, z_clean, eps, p_clean=None):
    """Differentiable probability-shift loss (module docstring): z_noisy (M, B, K), z_clean (B, K),
    optional p_clean (B, K) -> ``(loss, mse, stop)``, each (M,); gradient to z_noisy only. Shapes
    are not checked here: ``nsvit_fast.ops.prob_shift`` checks them."""
    return ProbShift.apply(z_noisy, z_clean, eps, p_clean)


__all__ = ["prob_shift", "prob_shift_forward", "ProbShift"]
