"""Triton kernels of nsvit-fast, installed as ``nsvit_fast.kernels`` (one file per op).

Each file holds the op's kernel(s) and its ``torch.autograd.Function``. They run on CUDA tensors,
or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported): correct there, thousands of times too slow to time. ``nsvit_fast.ops`` decides when
to call them; call them directly only to test or benchmark a kernel.
"""

from __future__ import annotations

import os


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device) -> bool:
    """True where these kernels can run on ``device``: CUDA with triton, or the CPU interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and interpreter())
