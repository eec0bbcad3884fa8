"""Batched nullspace projection: every non-overlapping patch of images projected with an
orthonormal basis Q (k, n), n = C r_h r_w:

    keep=True: p -> Q^T Q p        keep=False: p -> p - Q^T Q p

Shapes: images (B, C, H, W) with H, W multiples of the patch; basis (k, n); returns (B, C, H, W).
The torch reference patchifies, multiplies and unpatchifies; it defines the op.
"""

from __future__ import annotations

import torch

from ..errors import NsvitError
from ..runtime import exact_math
from ._backends import cpp_ok, cuda_ok, ext, triton_ok
from .dispatch import register
from .patches import patchify, unpatchify

TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12),
             torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _project(x: torch.Tensor, basis: torch.Tensor, patch: tuple[int, int], keep: bool) -> torch.Tensor:
    b, c, h, w = x.shape
    q = basis.detach().to(device=x.device, dtype=x.dtype)  # a constant: no backend gives it a gradient
    with exact_math():
        p = patchify(x, patch)
        part = (p @ q.T) @ q
        out = part if keep else p - part
        return unpatchify(out, c, (h // patch[0], w // patch[1]), patch)


class _TorchProject(torch.autograd.Function):
    # the op is linear and self-adjoint: backward and the forward-mode jvp are the op again, so they
    # too run without autocast or TF32 (torch's own backward of the products took the autocast of a
    # backward() called inside it). setup_context and the vmap rule keep torch.func working.
    generate_vmap_rule = True

    @staticmethod
    def forward(x, basis, patch, keep):
        return _project(x.detach(), basis, patch, keep)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, basis, patch, keep = inputs
        ctx.save_for_backward(basis)
        ctx.save_for_forward(basis)
        ctx.patch, ctx.keep = patch, keep

    @staticmethod
    def backward(ctx, g):
        basis, = ctx.saved_tensors
        return _TorchProject.apply(g, basis.detach(), ctx.patch, ctx.keep), None, None, None

    @staticmethod
    def jvp(ctx, t, *_):
        basis, = ctx.saved_tensors
        return _project(t, basis, ctx.patch, ctx.keep)


def nullspace_project_torch(x: torch.Tensor, basis: torch.Tensor, patch: tuple[int, int], keep: bool) -> torch.Tensor:
    """Torch reference, the definition of the op (arguments and result as
    :func:`nsvit_fast.ops.nullspace_project`): patchify, two products, unpatchify, in x's dtype.
    The products run without autocast or TF32 (``exact_math``), forward and backward: under bf16
    autocast they came out bf16 for fp32 images, and TF32 misses the fp32 tolerance (the Triton
    kernel pins its own precision)."""
    return _TorchProject.apply(x, basis, tuple(patch), bool(keep))


def check_inputs(x: torch.Tensor, basis: torch.Tensor, patch: tuple[int, int]) -> None:
    """Raise NsvitError unless x is (B, C, H, W) with H, W multiples of ``patch`` and the basis
    is (k, C * r_h * r_w)."""
    if not isinstance(x, torch.Tensor) or not isinstance(basis, torch.Tensor) or not x.is_floating_point() \
            or not basis.is_floating_point():
        got = [str(t.dtype)[6:] if isinstance(t, torch.Tensor) else type(t).__name__ for t in (x, basis)]
        raise NsvitError(f"nullspace_project: images and basis must be float tensors, got {got[0]} and {got[1]}")
    try:
        bad = len(patch) != 2 or not all(not isinstance(r, bool) and int(r) == r and r >= 1 for r in patch)
    except (TypeError, ValueError):
        bad = True
    if bad:
        raise NsvitError(f"nullspace_project: patch must be two whole numbers >= 1, got {patch}")
    if x.dim() != 4 or basis.dim() != 2:
        raise NsvitError(f"nullspace_project: images must be (B, C, H, W) and the basis (k, n), got "
                         f"{tuple(x.shape)} and {tuple(basis.shape)}")
    if x.shape[2] % patch[0] or x.shape[3] % patch[1]:
        raise NsvitError(f"nullspace_project: image size {tuple(x.shape[2:])} is not a multiple of the patch {patch}")
    if basis.shape[1] != x.shape[1] * patch[0] * patch[1]:
        raise NsvitError(f"nullspace_project: the basis has width {basis.shape[1]}, patches have "
                         f"{x.shape[1] * patch[0] * patch[1]} values")


class _ExtProject(torch.autograd.Function):
    # the extension converts the basis to its compute dtype (fp64 for fp64 images, else fp32): a
    # basis rounded to fp16 / bf16 first would lose precision for nothing
    @staticmethod
    def forward(ctx, x, basis, patch, keep):
        ctx.save_for_backward(basis)  # saved, not kept: an in-place change before backward is refused
        ctx.patch, ctx.keep = patch, keep
        with exact_math():  # its at::mm would take autocast's bf16 (then fail on a float pointer) and TF32
            return ext().nullspace_project(x.detach(), basis.detach(), patch[0], patch[1], keep)

    @staticmethod
    def backward(ctx, g):  # self-adjoint; through this Function again, so double backward is exact
        basis, = ctx.saved_tensors
        return _ExtProject.apply(g, basis.detach(), ctx.patch, ctx.keep), None, None, None


def nullspace_project_ext(x, basis, patch, keep):
    """The compiled (C++ on the CPU, CUDA) backend; computes in fp64 for fp64 images, else fp32,
    and returns x's dtype."""
    return _ExtProject.apply(x, basis, tuple(patch), bool(keep))


def nullspace_project_triton(x, basis, patch, keep):
    """The Triton backend (``nsvit_fast.kernels.nullspace_projection``), fp32 accumulation; fp64
    images go to the torch reference to keep its precision."""
    if x.dtype == torch.float64:  # the kernel accumulates in fp32; fp64 keeps the reference's precision
        return nullspace_project_torch(x, basis, patch, keep)
    from ..kernels.nullspace_projection import nullspace_project

    return nullspace_project(x, basis, patch, keep)


register("nullspace_project", "torch", nullspace_project_torch, tolerance=TOLERANCE)
# C++ on the CPU: 1.35x at the digits size, 1.0x at ViT-S/32, 0.87x at ViT-B/16 (bench_ops): not
# faster across sizes, so not the CPU default; force it with backend="cpp"
register("nullspace_project", "cpp", nullspace_project_ext, cpp_ok)
register("nullspace_project", "cuda", nullspace_project_ext, cuda_ok, prefer_on=("cuda",))
register("nullspace_project", "triton", nullspace_project_triton, triton_ok, prefer_on=("cuda",))
