"""Ahead-of-time compile of every Triton kernel for NVIDIA targets, with no GPU and no driver.

The launches compiled are the ones the autograd Functions really make: each op's forward and
backward runs on ``meta`` tensors (no memory, no GPU) under :func:`record_launches`, at the digits
model's shapes, ViT-B/16's and ViT-S/32's, in fp32, bf16 and fp16. Each distinct launch is specialised
exactly as ``JITFunction.run`` would on a GPU (argument types, integer and pointer alignment,
constexprs; CUDA allocations are 256-byte aligned, as meta pointers count) and compiled by
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``: PTX, then a cubin from
Triton's bundled ptxas, whose ``-v`` report gives registers and spills.

    python -m nsvit_fast.kernels.aot [--arch 80 90] [--jobs N] [--json report.json]

Exit status 0 only if every launch compiled to a cubin without register spills; run it without
``TRITON_INTERPRET`` (the interpreter's kernels are not compilable objects). The CI test
tests/test_aot_compile.py runs it in a subprocess with a fresh TRITON_CACHE_DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import torch

from . import Launch, interpreter, record_launches

ARCHS = (80, 90)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (op, shape name) -> the sizes the engines use: digits model (3x32x32, patch 8, D 96, 10 classes,
# batch 128, 8 noises), ViT-B/16 (3x224x224, patch 16, D 768, 1000 classes, batch 32, 8 noises) and
# ViT-S/32 (patch 32: n = 3072 against its rank-384 row space, several basis chunks; D 384, the
# BLOCK_D = 512 variants)
SHAPES = {
    "digits": dict(prob_shift=(8, 128, 10), nullspace_project=(128, 3, 32, 8, 96), token_assembly=(128, 16, 96, 8, 1)),
    "ViT-B/16": dict(prob_shift=(8, 32, 1000), nullspace_project=(32, 3, 224, 16, 2),
                     token_assembly=(32, 196, 768, 8, 1)),
    "ViT-S/32": dict(prob_shift=(8, 32, 1000), nullspace_project=(32, 3, 224, 32, 384),
                     token_assembly=(32, 49, 384, 8, 1)),
}


def _meta(*shape, dtype, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def _run_backward(outputs) -> None:
    outs = [o for o in outputs if o.requires_grad]
    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])


def op_launches(shape: str, dtype: torch.dtype) -> list[Launch]:
    """Every launch of the three ops' forward and backward at ``shape`` in ``dtype``, in the
    variants the engines use (with and without cached clean probabilities; keep and complement
    projections; token assembly with and without the clean copies, trainable and frozen LayerNorm,
    and with fp32 parameters as under autocast)."""
    from .nullspace_projection import nullspace_project
    from .prob_shift import prob_shift
    from .token_assembly import token_assembly

    s = SHAPES[shape]
    with record_launches() as rec:
        m, b, k = s["prob_shift"]
        for with_pc in (False, True):
            zn, zc = _meta(m, b, k, dtype=dtype, grad=True), _meta(b, k, dtype=dtype)
            _run_backward(prob_shift(zn, zc, 0.03, _meta(b, k, dtype=dtype) if with_pc else None)[:1])
        bsz, c, hw, p, kb = s["nullspace_project"]
        for keep in (True, False):
            x = _meta(bsz, c, hw, hw, dtype=dtype, grad=True)
            _run_backward([nullspace_project(x, _meta(kb, c * p * p, dtype=torch.float32), (p, p), keep)])
        bsz, n, d, m, pfx = s["token_assembly"]
        # (clean copies, frozen LayerNorm, parameters' dtype): fp32 parameters with fp16 / bf16
        # tokens are autocast's patch embedding (x and ln then fp32)
        for clean, frozen, pdt in ((True, False, dtype), (False, True, dtype), (True, False, torch.float32)):
            u, v = _meta(bsz, n, d, dtype=dtype, grad=True), _meta(m, n, d, dtype=dtype, grad=True)
            pre, pos = _meta(pfx, d, dtype=pdt, grad=not frozen), _meta(pfx + n, d, dtype=pdt, grad=not frozen)
            w, bias = _meta(d, dtype=pdt, grad=not frozen), _meta(d, dtype=pdt, grad=not frozen)
            _run_backward(token_assembly(u, v, pre, pos, w, bias, 1e-6, True, clean))
    return rec


@dataclass
class Compiled:
    """What compiling one launch for one architecture gave: the kernel's name, sm_<arch>, the
    signature and constexprs it was specialised to, the cubin's size, ptxas's register and spill
    counts (bytes), and the compile time in seconds."""

    kernel: str
    arch: int
    signature: str
    constexprs: str
    cubin_bytes: int
    registers: int
    spill_stores: int
    spill_loads: int
    seconds: float


def _specialise(launch: Launch, backend):
    """What JITFunction.run derives from the arguments before compiling: (options, signature,
    constexprs, attrs), through triton's own binder for this kernel and backend."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.constexprs)
    return fn._pack_args(backend, launch.constexprs, bound, specialization, options)


PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """Compile one launch for sm_<arch>; raises whatever triton or ptxas raises."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    options, signature, constexprs, attrs = _specialise(launch, make_backend(target))
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report is printed, not kept: read it from stdout
    log = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(log):
        ck = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    seconds = time.perf_counter() - t
    spills, regs = PTXAS_SPILLS.findall(log.getvalue()), PTXAS_REGS.findall(log.getvalue())
    if not spills or not regs:
        # a cached kernel skips ptxas: run with a fresh TRITON_CACHE_DIR
        raise RuntimeError(f"{launch.name} sm_{arch}: no ptxas report (cached compile?)")
    return Compiled(launch.name, arch, ",".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr"),
                    ",".join(f"{launch.kernel.arg_names[k[0]]}={v}" for k, v in sorted(constexprs.items())),
                    len(ck.asm.get("cubin", b"")),
                    int(regs[0]), int(spills[0][0]), int(spills[0][1]), round(seconds, 3))


def compile_all(archs=ARCHS, shapes=tuple(SHAPES), dtypes=tuple(DTYPES), jobs: int = 1) -> dict:
    """Record every op's launches at each shape and dtype, compile each distinct one per arch.

    ``jobs`` > 1 compiles in that many forked processes (ptxas dominates). Returns
    {"compiled": [Compiled as dict], "failed": [{kernel, arch, where, error}],
    "kernels": sorted names, "seconds": total}."""
    if interpreter():
        raise RuntimeError("nsvit_fast.kernels.aot needs TRITON_INTERPRET unset: the interpreter's kernels "
                           "cannot be compiled")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    t0 = time.perf_counter()
    unique: dict[tuple, tuple[Launch, str]] = {}
    for shape in shapes:
        for dt in dtypes:
            for launch in op_launches(shape, DTYPES[dt]):
                for arch in archs:
                    backend = make_backend(GPUTarget("cuda", arch, 32))
                    options, signature, constexprs, attrs = _specialise(launch, backend)
                    key = (launch.name, arch, tuple(signature.items()), repr(sorted(constexprs.items())), repr(attrs),
                           options.num_warps, options.num_stages)
                    unique.setdefault(key, (launch, f"{shape} {dt}"))
    global _PENDING
    _PENDING = [(launch, arch, where) for (_, arch, *_), (launch, where) in unique.items()]
    n = len(_PENDING)
    if jobs > 1 and n > 1:  # forked workers inherit the launches (meta tensors, jit functions)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(jobs, n), mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_pending, range(n)))
    else:
        results = [_compile_pending(i) for i in range(n)]
    return {"compiled": [r for ok, r in results if ok], "failed": [r for ok, r in results if not ok],
            "kernels": sorted({k[0] for k in unique}), "seconds": round(time.perf_counter() - t0, 1)}


_PENDING: list = []


def _compile_pending(i: int) -> tuple[bool, dict]:
    launch, arch, where = _PENDING[i]
    try:
        return True, asdict(compile_launch(launch, arch)) | {"where": where}
    except Exception as e:  # noqa: BLE001 (every compile error is reported, not just the first)
        return False, {"kernel": launch.name, "arch": arch, "where": where, "error": f"{type(e).__name__}: {e}"[:4000]}


def main(argv=None) -> int:
    """``python -m nsvit_fast.kernels.aot [--arch 80 90] [--jobs N] [--json FILE]``: compile every
    launch the ops make, print one line per compile, write the full report to FILE (atomically).

    Returns 0 when every launch compiled to a cubin without spills, else 1 (failures and spills are
    printed to stderr)."""
    ap = argparse.ArgumentParser(prog="python -m nsvit_fast.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 = sm_80)")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="parallel compiles")
    ap.add_argument("--json", help="write the full report here")
    args = ap.parse_args(argv)
    report = compile_all(tuple(args.arch), jobs=args.jobs)
    bad = [c for c in report["compiled"] if not c["cubin_bytes"] or c["spill_stores"] or c["spill_loads"]]
    for c in report["compiled"]:
        print(f"sm_{c['arch']} {c['kernel']:20s} {c['where']:14s} regs {c['registers']:3d} spills "
              f"{c['spill_stores']}/{c['spill_loads']} cubin {c['cubin_bytes']:6d} B  {c['seconds']:.2f} s  "
              f"[{c['constexprs']}]")
    for f in report["failed"]:
        print(f"FAILED sm_{f['arch']} {f['kernel']} ({f['where']}): {f['error']}", file=sys.stderr)
    for c in bad:
        print(f"BAD sm_{c['arch']} {c['kernel']} ({c['where']}): cubin {c['cubin_bytes']} B, spills "
              f"{c['spill_stores']}/{c['spill_loads']}", file=sys.stderr)
    print(f"{len(report['compiled'])} compiled, {len(report['failed'])} failed, {len(bad)} with spills or no cubin, "
          f"{report['seconds']} s")
    if args.json:
        from nsvit_fast.io import write_json

        write_json(args.json, report)
    return 0 if not report["failed"] and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
