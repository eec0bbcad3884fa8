"""Triton kernels of nsvit-fast, installed as ``nsvit_fast.kernels`` (one file per op).

Each file holds the op's kernel(s) and its ``torch.autograd.Function``. They run on CUDA tensors,
or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported): correct there, thousands of times too slow to time. ``nsvit_fast.ops`` decides when
to call them; call them directly only to test or benchmark a kernel.

Every launch goes through :func:`launch`, so that :func:`record_launches` can list the launches
an autograd Function really makes (kernel, grid, arguments, constexprs) without running them:
``nsvit_fast.kernels.aot`` compiles exactly those for sm_80 / sm_90 with no GPU.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any


def interpreter() -> bool:
    """True when this process's kernels run in Triton's CPU interpreter. Triton decides that when it
    decorates them, from ``TRITON_INTERPRET=1`` at their import, so the kernels are asked, not the
    variable's value now (set or unset later, it changes nothing)."""
    from triton.runtime.interpreter import InterpretedFunction

    from .prob_shift import _rows_kernel  # decorated now if not imported yet, with today's variable

    return isinstance(_rows_kernel, InterpretedFunction)


def available(device) -> bool:
    """True where these kernels can run on ``device``: CUDA with triton, or the CPU interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and interpreter())


@dataclass
class Launch:
    """One kernel launch as an autograd Function makes it: the @triton.jit function, the grid,
    the runtime arguments in order (tensors, ints, floats) and the constexpr keyword arguments."""

    kernel: Any                      # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple                      # runtime arguments, in order (tensors, ints, floats)
    constexprs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The kernel function's name (``_rows_kernel``), also for a wrapped JITFunction."""
        return getattr(self.kernel, "__name__", None) or self.kernel.fn.__name__


class _Recording(threading.local):
    launches: list[Launch] | None = None  # per thread: one thread's record_launches sees only its launches


_recording = _Recording()


def launch(kernel, grid: tuple[int, ...], *args, **constexprs) -> None:
    """Launch ``kernel[grid](*args, **constexprs)``; an empty grid (an empty input) launches
    nothing (CUDA rejects a zero-size grid). Under :func:`record_launches` only record it.

    On CUDA the launch runs with the first tensor argument's device current: Triton launches on
    the current device, so a process working on cuda:1 (current device 0) would otherwise run the
    kernel on cuda:0 with cuda:1 pointers. The caller keeps every tensor argument on one device."""
    grid = tuple(int(g) for g in grid)
    rec = _recording.launches
    if rec is not None:
        rec.append(Launch(kernel, grid, args, constexprs))
        return
    if not all(grid):
        return
    import torch

    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    with torch.cuda.device(dev) if dev is not None and dev.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **constexprs)


@contextlib.contextmanager
def record_launches():
    """Within the block, :func:`launch` records instead of running (outputs stay uninitialised):
    run an op on ``meta`` tensors to list its launches at any shape without memory or a GPU.

    Per thread: launches made by this thread (including the backward passes it runs: autograd's
    device threads are off inside the block) are recorded, another thread's launches run as usual
    or go to that thread's own recording."""
    import torch

    saved, _recording.launches = _recording.launches, []
    try:
        # a CUDA backward would run on autograd's device thread, outside this thread's recording
        with torch.autograd.set_multithreading_enabled(False):
            yield _recording.launches
    finally:
        _recording.launches = saved


__all__ = ["interpreter", "available", "Launch", "launch", "record_launches"]
