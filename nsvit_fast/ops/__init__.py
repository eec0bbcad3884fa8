"""Ops behind one dispatch, each defined by a torch reference, with Triton / C++ / CUDA backends.

    prob_shift(z_noisy (M,B,K), z_clean (B,K), eps, p_clean=None) -> loss (M,), mse (M,), stop (M,)
    nullspace_project(images (B,C,H,W), basis (k,n), patch, keep) -> images
    token_assembly(u, v, prefix, pos, weight, bias, eps, embed_prefix, include_clean) -> x, ln

Backend choice per op and device (``backend=`` or ``NSVIT_BACKEND=torch|cpp|cuda|triton`` or
``NSVIT_BACKEND=op=backend,...`` forces one): on CUDA triton, then cuda, then torch; on the CPU
the compiled C++ op where bench/bench_ops.py measured it faster than torch, else torch. Triton on
the CPU runs only under the interpreter (TRITON_INTERPRET=1), never by default.
"""

from . import nullspace_projection as _nullspace_projection
from . import prob_shift as _prob_shift
from . import token_assembly as _token_assembly
from .dispatch import backend_for, backends, call, register
from .patches import patchify, unpatchify


def prob_shift(z_noisy, z_clean, eps, p_clean=None, backend=None):
    _prob_shift.check_inputs(z_noisy, z_clean, p_clean)
    return call("prob_shift", z_noisy, z_clean, eps, p_clean, backend=backend)


def nullspace_project(images, basis, patch, keep, backend=None):
    patch = tuple(patch)
    _nullspace_projection.check_inputs(images, basis, patch)
    return call("nullspace_project", images, basis, patch, keep, backend=backend)


def token_assembly(u, v, prefix, pos, weight, bias, eps, embed_prefix=True, include_clean=False, backend=None):
    return call("token_assembly", u, v, prefix, pos, weight, bias, eps, embed_prefix, include_clean, backend=backend)


TOLERANCES = {"prob_shift": _prob_shift.TOLERANCE, "nullspace_project": _nullspace_projection.TOLERANCE,
              "token_assembly": _token_assembly.TOLERANCE}

__all__ = ["call", "register", "backend_for", "backends", "prob_shift", "nullspace_project", "token_assembly",
           "patchify", "unpatchify", "TOLERANCES"]
