"""Backend availability: the compiled extension (nsvit_fast._C) and the Triton kernels."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def ext():
    """The compiled extension, or None if it was not built (``make ext``)."""
    try:
        from .. import _C
    except ImportError:
        return None
    return _C


def cpp_ok(dev: torch.device) -> bool:
    """True on the CPU when the extension is built."""
    return dev.type == "cpu" and ext() is not None


def cuda_ok(dev: torch.device) -> bool:
    """True on CUDA when the extension is built with its CUDA ops."""
    return dev.type == "cuda" and ext() is not None and bool(ext().has_cuda())


def triton_ok(dev: torch.device) -> bool:
    """True where the Triton kernels can run on ``dev`` (see ``nsvit_fast.kernels.available``)."""
    try:
        from ..kernels import available
    except ImportError:
        return False
    return available(dev)
