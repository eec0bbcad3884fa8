"""One dispatch for every op: engines call ops by name, only this module picks a backend.

Each op registers implementations per backend with an availability test. The choice for a call
is: the ``backend=`` argument, else the ``NSVIT_BACKEND`` environment variable (one backend for
every op that has it, or ``op=backend,op=backend``), else the first available backend in the op's
preference order for the tensor's device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import NsvitError


@dataclass
class Op:
    """One op's registry entry: its implementations, their availability tests and, per device
    type, the order in which backends are tried."""

    name: str
    impls: dict[str, Callable] = field(default_factory=dict)
    available: dict[str, Callable[[torch.device], bool]] = field(default_factory=dict)
    preference: dict[str, list[str]] = field(default_factory=lambda: {"cuda": [], "cpu": []})
    # per dtype, the rtol / atol every backend is held to against the torch reference
    tolerance: dict[torch.dtype, dict[str, float]] | None = None


OPS: dict[str, Op] = {}


def register(op: str, backend: str, fn: Callable, available: Callable[[torch.device], bool] = lambda d: True,
             prefer_on: tuple[str, ...] = (), tolerance: dict | None = None) -> None:
    """Register ``fn`` as ``op``'s ``backend`` implementation; ``prefer_on`` device types put it
    ahead of those already registered there (the torch reference registers first, last in line,
    with the op's ``tolerance``: {dtype: dict(rtol=, atol=)} for fp32, fp64, fp16 and bf16).

    ``available(device) -> bool`` says where ``fn`` can run (checked per call). Registering a
    backend again replaces it and its place in the order. Called at import by each op's module
    (``nsvit_fast/ops/<op>.py``, imported by ``nsvit_fast/ops/__init__.py``, which also gives the
    op its public function; tests/test_ops.py checks that every registered op has all of these)."""
    o = OPS.setdefault(op, Op(op))
    if tolerance is not None:
        o.tolerance = tolerance
    o.impls[backend] = fn
    o.available[backend] = available
    for dev in ("cuda", "cpu"):
        pref = o.preference.setdefault(dev, [])
        if backend in pref:
            pref.remove(backend)
        pref.insert(0, backend) if dev in prefer_on else pref.append(backend)


def _forced(op: str) -> tuple[str | None, bool]:
    """(the backend NSVIT_BACKEND forces for ``op`` or None, whether it is the one global value)."""
    env = os.environ.get("NSVIT_BACKEND", "").strip()
    if not env:
        return None, False
    if "=" not in env:
        return env, True
    found = None
    for part in env.split(","):
        k, eq, v = part.partition("=")
        if not eq or k.strip() not in OPS or not v.strip():  # a typo would have left that op on its default
            raise NsvitError(f"NSVIT_BACKEND={env!r}: {part.strip()!r} is not OP=BACKEND with OP one of "
                             f"{', '.join(sorted(OPS))} (or give one backend for every op)")
        if k.strip() == op:
            found = v.strip()
    return found, False


def backend_for(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """The backend that runs ``op`` on ``device``.

    Args:
        op: a registered op name (``prob_shift``, ``nullspace_project``, ``token_assembly``).
        device: where the op's tensors live.
        backend: force this backend; else ``NSVIT_BACKEND`` (one backend for every op that has
            it, the others keep their order; or ``op=backend,...``) forces one; else the first
            available in the device's preference order.

    Returns:
        the backend's name; ``torch`` when nothing in the preference order is available.

    Raises:
        NsvitError: an unknown op, a backend forced for this op (``backend=`` or ``op=backend``)
        that it lacks, a global NSVIT_BACKEND that no op has, or a forced backend that is not
        available on the device.
    """
    o = OPS.get(op)
    if o is None:
        raise NsvitError(f"unknown op {op!r} (ops: {', '.join(sorted(OPS))})")
    device = torch.device(device)
    want, everywhere = (backend, False) if backend else _forced(op)
    if everywhere and want not in o.impls:
        # NSVIT_BACKEND=cuda means "the CUDA backend where an op has one": token_assembly has none.
        # A name no op has is a typo, not a preference
        known = sorted({b for other in OPS.values() for b in other.impls})
        if want not in known:
            raise NsvitError(f"NSVIT_BACKEND={want!r}: no op has that backend (backends: {', '.join(known)})")
        want = None
    if want is not None:
        if want not in o.impls:
            raise NsvitError(f"op {op}: no backend {want!r} (backends: {', '.join(o.impls)})")
        if not o.available[want](device):
            raise NsvitError(f"op {op}: backend {want!r} is not available on {device.type}")
        return want
    for b in o.preference.get(device.type, []):
        if o.available[b](device):
            return b
    return "torch"


def call(op: str, *args, backend: str | None = None, device=None, **kwargs):
    """Run ``op`` with the backend :func:`backend_for` chooses; returns what the implementation
    returns. ``device`` defaults to the first tensor argument's (the CPU if there is none).
    Raises NsvitError as :func:`backend_for` does."""
    if device is None:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    chosen = backend_for(op, device, backend)  # raises for an unknown op or backend
    return OPS[op].impls[chosen](*args, **kwargs)


def backends(op: str) -> list[str]:
    """The backends registered for ``op`` (available or not), in registration order; [] for an
    unknown op."""
    return list(OPS[op].impls) if op in OPS else []
