"""Ops behind one dispatch (``dispatch.call(name, ...)``), each with a torch reference that defines it.

    prob_shift(z_noisy (M,B,K), z_clean (B,K), eps, p_clean=None) -> loss (M,), mse (M,), stop (M,)
"""

from . import prob_shift as _prob_shift  # noqa: F401  (registers the op)
from .dispatch import backend_for, backends, call, register


def prob_shift(z_noisy, z_clean, eps, p_clean=None, backend=None):
    return call("prob_shift", z_noisy, z_clean, eps, p_clean, backend=backend)


__all__ = ["call", "register", "backend_for", "backends", "prob_shift"]
