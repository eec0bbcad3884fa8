"""Ops behind one dispatch, each defined by a torch reference, with Triton / C++ / CUDA backends.

    prob_shift(z_noisy (M,B,K), z_clean (B,K), eps, p_clean=None) -> loss (M,), mse (M,), stop (M,)
    nullspace_project(images (B,C,H,W), basis (k,n), patch, keep) -> images
    token_assembly(u, v, prefix, pos, weight, bias, eps, embed_prefix, include_clean) -> x, ln

Backend choice per op and device (``backend=`` or ``NSVIT_BACKEND=torch|cpp|cuda|triton`` or
``NSVIT_BACKEND=op=backend,...`` forces one; a single NSVIT_BACKEND value applies to the ops that
have that backend): on CUDA triton, then cuda, then torch; on the CPU
the compiled C++ op where bench/bench_ops.py measured it faster than torch, else torch. Triton on
the CPU runs only under the interpreter (TRITON_INTERPRET=1), never by default.
"""

from . import nullspace_projection as _nullspace_projection
from . import prob_shift as _prob_shift
from . import token_assembly as _token_assembly
from .dispatch import OPS, backend_for, backends, call, register
from .patches import patchify, unpatchify

_OP_MODULES = (_nullspace_projection, _prob_shift, _token_assembly)  # imported for their register() calls


def prob_shift(z_noisy, z_clean, eps, p_clean=None, backend=None):
    """The synthesis objective and its early-stop test for M noises in one op (paper Eq. 7, Alg. 1
    lines 8-12, as the official code computes them)::

        loss[m] = mean_b ||z_noisy[m, b] - z_clean[b]||_2
        mse[m]  = mean_b ||softmax(z_noisy[m, b]) - softmax(z_clean[b])||_2^2,   stop[m] = mse[m] < eps

    Args:
        z_noisy: (M, B, K) logits of the noisy inputs, floating point; the gradient flows here.
        z_clean: (B, K) clean logits on the same device; a constant (no gradient).
        eps: the stop threshold on ``mse``.
        p_clean: optional (B, K) ``softmax(z_clean)`` when the caller has it cached.
        backend: ``torch``, ``cpp``, ``cuda`` or ``triton`` to force one (see :func:`backend_for`).

    Returns:
        ``(loss, mse, stop)``, each (M,): loss and mse float64 for float64 logits on every
        backend (the Triton and CUDA ones run the torch reference for them), else float32 from
        the compiled and Triton backends (z_noisy's dtype from the reference); loss with grad to
        z_noisy, mse and stop (bool) without. Nothing is read back to the host.

    Raises:
        NsvitError: shapes that do not match, tensors (p_clean included) on two devices, integer
        logits, or a forced backend that is unknown or unavailable on the device.
    """
    _prob_shift.check_inputs(z_noisy, z_clean, p_clean)
    return call("prob_shift", z_noisy, z_clean, eps, p_clean, backend=backend)


def nullspace_project(images, basis, patch, keep, backend=None):
    """Project every non-overlapping patch of the images with an orthonormal basis Q (k, n)::

        keep=True: p -> Q^T Q p        keep=False: p -> p - Q^T Q p

    Args:
        images: (B, C, H, W), H and W multiples of the patch.
        basis: (k, n) orthonormal rows, n = C * r_h * r_w (patches flattened as (C, r_h, r_w),
            see :func:`patchify`); a constant (no gradient). k may be 0.
        patch: (r_h, r_w).
        keep: project onto span Q (True) or onto its orthogonal complement (False).
        backend: force one backend (see :func:`backend_for`).

    Returns:
        a new tensor (B, C, H, W) in the images' dtype; differentiable w.r.t. images (the op is
        self-adjoint).

    Raises:
        NsvitError: images not 4-D or basis not 2-D, an image size that is not a multiple of the
        patch, a basis width other than C * r_h * r_w, or an unknown / unavailable forced backend.
    """
    patch = tuple(patch)
    _nullspace_projection.check_inputs(images, basis, patch)
    return call("nullspace_project", images, basis, patch, keep, backend=backend)


def token_assembly(u, v, prefix, pos, weight, bias, eps, embed_prefix=True, include_clean=False, backend=None):
    """The encoder input for every (noise m, image b) pair, and the first block's LayerNorm of it::

        x[r] = [prefix, u[b] + v[m]] + pos,   ln[r] = LayerNorm(x[r]; weight, bias, eps)
        rows r: the clean images b first (if include_clean), then noise-major (m, b)

    Args:
        u: (B, N, D) patch tokens.
        v: (M, N, D) token-space noises, or None (M = 0, then include_clean must be True).
        prefix: (P, D) class / register tokens (P may be 0).
        pos: (P + N, D) if ``embed_prefix`` else (N, D), the positional embedding.
        weight, bias: (D,) the first block's LayerNorm affine, or None (ones / zeros); eps its epsilon.
        embed_prefix: whether ``pos`` covers the prefix tokens (timm's ``no_embed_class`` False).
        include_clean: also emit the B clean rows (the fused 2B batch of NS finetuning).
        backend: force one backend (see :func:`backend_for`).

    Returns:
        ``(x, ln)``, each (R, P + N, D) with R = B * include_clean + M * B, in the promoted dtype
        of u, v, prefix and pos (fp32 for bf16 tokens under autocast), differentiable w.r.t.
        every tensor argument. With the torch backend the operations follow timm's ``_pos_embed``
        order, so the encoder output equals the model's own.

    Raises:
        NsvitError: an unknown or unavailable forced backend. Shapes are not checked here (the
        adapters build the arguments); mismatched ones fail inside torch or the kernel.
    """
    if (v is None or v.shape[0] == 0) and not include_clean:  # no rows: the backends disagreed (error, or empty)
        from ..errors import NsvitError

        raise NsvitError("token_assembly: no rows: give at least one noise, or include_clean=True")
    return call("token_assembly", u, v, prefix, pos, weight, bias, eps, embed_prefix, include_clean, backend=backend)


TOLERANCES = {name: op.tolerance for name, op in OPS.items()}  # each op's, as its torch reference registered it

__all__ = ["call", "register", "backend_for", "backends", "prob_shift", "nullspace_project", "token_assembly",
           "patchify", "unpatchify", "TOLERANCES"]
