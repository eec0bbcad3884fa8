"""Where and how a run computes: device, precision, torch.compile.

One :class:`Runtime` travels with every engine; the CLI and the YAML configs only fill it.

    device     auto | cpu | cuda | cuda:N      auto = CUDA when available; under torchrun each rank
                                               takes its LOCAL_RANK GPU
    precision  fp32 | tf32 | bf16 | fp16       autocast for the model's forward/backward; the noise,
                                               its optimiser state and loss reductions stay fp32;
                                               fp16 adds a GradScaler
    compile    False | True                    torch.compile of the encoder (timm train.py's --torchcompile)

The exact-nullspace work (basis, projection, invariance checks, watermark, targeted edits) runs in
fp32/fp64 with TF32 off whatever the precision: :func:`exact_math` switches TF32 off for its block.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .errors import NsvitError, env_int

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``spec``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``,
    ``cuda:N``. Under torchrun (LOCAL_RANK set) ``auto`` and ``cuda`` mean this rank's GPU.

    Raises NsvitError for an unknown spec, CUDA where there is none, a GPU index past the count,
    or ``cuda:N`` in a run of several ranks (all of them on GPU N)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    local = env_int("LOCAL_RANK", -1)
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        spec = "cuda"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        tail = spec[5:]
        if spec != "cuda" and not tail.isdigit():
            raise NsvitError(f"device must be one of {', '.join(DEVICES)}, got {spec!r}")
        if spec != "cuda" and env_int("WORLD_SIZE", 1) > 1 and int(tail) != local:
            # every rank on GPU N: NCCL refuses two ranks on one GPU, in a traceback (cuda:$LOCAL_RANK is fine)
            raise NsvitError(f"device {spec!r} under WORLD_SIZE={env_int('WORLD_SIZE', 1)} is not this rank's GPU "
                             f"(LOCAL_RANK={os.environ.get('LOCAL_RANK', 'unset')}): ranks would share a GPU; give "
                             f"--device cuda (or auto), and each rank takes its LOCAL_RANK's GPU")
        if not torch.cuda.is_available():
            raise NsvitError(f"device {spec!r} asked for, but torch sees no CUDA GPU on this machine "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        if spec == "cuda":
            index = local if local >= 0 else torch.cuda.current_device()
        else:
            index = int(tail)
        if index >= torch.cuda.device_count():
            raise NsvitError(f"device cuda:{index} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    raise NsvitError(f"device must be one of {', '.join(DEVICES)}, got {spec!r}")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of PRECISIONS, else NsvitError."""
    if precision not in PRECISIONS:
        raise NsvitError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def check_cpu_compiler() -> str:
    """The C++ compiler torch.compile needs for CPU kernels, found as inductor finds it (its config's
    ``cpp.cxx``, i.e. ``$CXX`` or g++); NsvitError up front if there is none, rather than inductor's
    traceback at the first forward."""
    from torch._inductor import config, cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        tried = ", ".join(c for c in config.cpp.cxx if c)
        raise NsvitError(f"compile on the CPU needs a working C++ compiler, and torch inductor found none "
                         f"(tried {tried}): install g++ or set CXX, or leave compile off") from None


@dataclass
class Runtime:
    """Device, precision and compilation of one run. ``Runtime.create`` resolves and checks them."""

    device: torch.device
    precision: str = "fp32"
    compile: bool = False

    @classmethod
    def create(cls, device: str | torch.device | None = "auto", precision: str = "fp32",
               compile: bool = False) -> "Runtime":
        """Resolve ``device`` (:func:`resolve_device`) and check ``precision``.

        Raises:
            NsvitError: an unknown device or precision, CUDA where there is none, fp16 on the
            CPU (CPU autocast is bf16), or compile on the CPU without a C++ compiler.
        """
        rt = cls(resolve_device(device), check_precision(precision), bool(compile))
        if rt.precision == "fp16" and rt.device.type == "cpu":
            raise NsvitError("precision fp16 needs a CUDA device (CPU autocast is bf16); use --precision bf16")
        if rt.compile and rt.device.type == "cpu":
            check_cpu_compiler()
        return rt

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype (None for fp32/tf32)."""
        return _AUTOCAST_DTYPE.get(self.precision)

    def autocast(self):
        """Autocast for the model's forward (and the backward through it); a no-op for fp32/tf32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> "torch.amp.GradScaler | None":
        """A GradScaler for fp16 (its small range loses gradients without one), else None."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    @contextlib.contextmanager
    def matmul_mode(self):
        """TF32 matmuls for ``tf32`` (and under bf16/fp16 autocast, for the ops left in fp32); the
        previous setting is restored on exit."""
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if self.precision != "fp32" else "highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(old)

    def describe(self) -> dict:
        """A JSON-able record for logs and benchmark results."""
        d = {"device": str(self.device), "precision": self.precision, "compile": self.compile}
        if self.device.type == "cuda":
            d["device_name"] = torch.cuda.get_device_name(self.device)
        return d


@contextlib.contextmanager
def exact_math():
    """TF32 and autocast off (matmul and cuDNN, CPU and CUDA) for the block: the exact-nullspace work
    must not lose 13 mantissa bits to tensor cores, nor run in bf16 / fp16, whatever precision the
    model otherwise runs in (under ``eval --precision bf16`` the nullspace suite had scored a
    29.7% match at scale 1000)."""
    old_mm = torch.get_float32_matmul_precision()
    old_cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(old_mm)
        torch.backends.cudnn.allow_tf32 = old_cudnn


def device_kind(device: torch.device) -> str:
    """A folder-safe name for results of this device: ``cpu``, or the GPU's name as a slug
    (``nvidia-h100-80gb-hbm3``), so benchmarks never overwrite another device's results."""
    import re

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


__all__ = ["DEVICES", "PRECISIONS", "resolve_device", "check_precision", "Runtime", "exact_math", "device_kind"]
