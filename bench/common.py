"""What the benchmark scripts share: the --device / --precision flags resolved through
nsvit_fast.runtime (a bad one is one error line and exit 2, as in the CLI), the machine line,
the GPU sync a timer needs, and the ns finetuning step the engine runs.

The scripts run as ``python bench/<script>.py``, so this file is importable as ``common``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F

from nsvit_fast.errors import NsvitError
from nsvit_fast.runtime import Runtime


def add_runtime_args(ap: argparse.ArgumentParser, precision: bool = True) -> None:
    """--device and (unless the script takes several precisions) --precision, with the engines' choices."""
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: CUDA when available)")
    if precision:
        ap.add_argument("--precision", default="fp32", help="fp32, tf32, bf16 or fp16 (autocast of the model)")


def runtime_or_none(prog: str, device: str, precision: str = "fp32") -> Runtime | None:
    """The Runtime, or None after printing ``<prog>: error: ...`` (the caller then returns 2)."""
    try:
        return Runtime.create(device, precision)
    except NsvitError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None


def sync(rt: Runtime) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on the CPU)."""
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what platform reports."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(rt: Runtime) -> str:
    """The device (GPU name, or CPU model and cores), torch version and CPU threads, for a results header."""
    if rt.device.type == "cuda":
        return f"{torch.cuda.get_device_name(rt.device)}, torch {torch.__version__}"
    return f"CPU ({cpu_model()}, {os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} threads"


def ns_step(parts, opt, x, y, v, rt: Runtime, fused: bool = True) -> None:
    """One ns finetuning step under ``rt``'s precision: CE on the clean and the noisy view, backward,
    ``opt.step()``. ``fused`` runs both views as one 2B batch (``fused_views``, what the engine runs);
    otherwise the patch embedding and encoder run twice, as in the official code. The caller puts
    ``parts`` in train mode and wraps the steps in ``rt.matmul_mode()``."""
    from nsvit_fast.train.methods.ns import fused_views

    with rt.autocast():
        if fused:
            z, zn = fused_views(parts, x, v)
        else:
            z = parts.encode(parts.patch_embed(x))
            zn = parts.encode(parts.patch_embed(x) + v)
        loss = F.cross_entropy(z.float(), y) + F.cross_entropy(zn.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
