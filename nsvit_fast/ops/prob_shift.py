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

from ..errors import NsvitError
from ._autograd import links, once_differentiable
from ._backends import cpp_ok, cuda_ok, ext, triton_ok
from .dispatch import register

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12),
             torch.float16: dict(rtol=1e-2, atol=1e-3), torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}


def check_inputs(z_noisy: torch.Tensor, z_clean: torch.Tensor, p_clean: torch.Tensor | None) -> None:
    """Raise NsvitError unless z_noisy is (M, B, K), z_clean (B, K) and p_clean None or (B, K),
    on one device, in a floating-point dtype (what every backend assumes)."""
    if z_noisy.dim() != 3 or z_clean.dim() != 2 or tuple(z_noisy.shape[1:]) != tuple(z_clean.shape):
        raise NsvitError(f"prob_shift: z_noisy must be (M, B, K) and z_clean (B, K), got {tuple(z_noisy.shape)} "
                         f"and {tuple(z_clean.shape)}")
    if p_clean is not None and p_clean.shape != z_clean.shape:
        raise NsvitError(f"prob_shift: p_clean {tuple(p_clean.shape)} must match z_clean {tuple(z_clean.shape)}")
    if z_noisy.device != z_clean.device:
        raise NsvitError(f"prob_shift: z_noisy on {z_noisy.device}, z_clean on {z_clean.device}")
    if p_clean is not None and p_clean.device != z_noisy.device:  # the kernels read it through z_noisy's device
        raise NsvitError(f"prob_shift: p_clean on {p_clean.device}, z_noisy on {z_noisy.device}")
    if not z_noisy.is_floating_point() or not z_clean.is_floating_point():
        raise NsvitError(f"prob_shift: logits must be floating point, got {z_noisy.dtype} and {z_clean.dtype}")


def prob_shift_torch(z_noisy: torch.Tensor, z_clean: torch.Tensor, eps: float,
                     p_clean: torch.Tensor | None = None):
    """Torch reference: the definition of the op (z_clean is a constant, as in every backend)."""
    z_clean = z_clean.detach()
    # vector_norm's backward is 0 at a zero difference, where sqrt(sum(d^2)) would give NaN
    loss = torch.linalg.vector_norm(z_noisy - z_clean, dim=-1).mean(-1)
    with torch.no_grad():
        p_clean = z_clean.softmax(-1) if p_clean is None else p_clean
        mse = (z_noisy.detach().softmax(-1) - p_clean).pow(2).sum(-1).mean(-1)
    return loss, mse, mse < eps


class _ExtProbShift(torch.autograd.Function):
    """The compiled (C++ / CUDA) forward; the gradient rows it returns are scaled in backward.
    Once differentiable (the rows are constants to autograd): a second derivative raises."""

    @staticmethod
    def forward(ctx, z_noisy, z_clean, eps, p_clean):
        loss, mse, stop, grad = ext().prob_shift(z_noisy.detach(), z_clean.detach(),
                                                 None if p_clean is None else p_clean.detach(), float(eps))
        ctx.save_for_backward(grad)
        ctx.links = links(z_noisy)  # the rows depend on z_noisy: a double backward through them raises
        ctx.in_dtype = z_noisy.dtype
        ctx.mark_non_differentiable(mse, stop)
        # float32 as the other backends, float64 kept for float64 logits (the reference's precision)
        return loss.to(torch.float64 if z_noisy.dtype == torch.float64 else torch.float32), mse, stop

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_mse, g_stop):
        (grad,) = ctx.saved_tensors
        return (grad * g_loss.reshape(-1, 1, 1).to(grad.dtype)).to(ctx.in_dtype), None, None, None


def prob_shift_ext(z_noisy, z_clean, eps, p_clean=None):
    """The compiled (C++ on the CPU, CUDA) backend; same arguments and results as the torch
    reference, loss in float32 (float64 for float64 logits). Needs the extension built with the
    matching device. The C++ op computes fp64 logits in fp64; the CUDA kernel accumulates in fp32, so fp64 logits on CUDA go
    to the torch reference (fp64 results)."""
    if z_noisy.dtype == torch.float64 and z_noisy.device.type == "cuda":
        return prob_shift_torch(z_noisy, z_clean, eps, p_clean)
    return _ExtProbShift.apply(z_noisy, z_clean, eps, p_clean)


def prob_shift_triton(z_noisy, z_clean, eps, p_clean=None):
    """The Triton backend (``nsvit_fast.kernels.prob_shift``); same arguments and results as the
    torch reference, loss and mse in float32. The kernel accumulates in fp32: fp64 logits go to
    the torch reference to keep its precision (fp64 results)."""
    if z_noisy.dtype == torch.float64:
        return prob_shift_torch(z_noisy, z_clean, eps, p_clean)
    from ..kernels.prob_shift import prob_shift

    return prob_shift(z_noisy, z_clean, eps, p_clean)


register("prob_shift", "torch", prob_shift_torch, tolerance=TOLERANCE)
# C++ is the CPU default when built: 1.2x torch at 10 classes, 1.2-2.8x at 1000 (bench_ops, forward
# + backward); its softmaxes are ATen's vectorised ones, the rest is one fused pass per row
register("prob_shift", "cpp", prob_shift_ext, cpp_ok, prefer_on=("cpu",))
register("prob_shift", "cuda", prob_shift_ext, cuda_ok, prefer_on=("cuda",))
register("prob_shift", "triton", prob_shift_triton, triton_ok, prefer_on=("cuda",))
