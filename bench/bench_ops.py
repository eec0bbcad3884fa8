"""Op microbenchmarks (pytest-benchmark): every op, every backend available on the device, at the
token / logit / image shapes of the digits model, ViT-S/32 and ViT-B/16. Forward + backward.

    .venv/bin/python bench/bench_ops.py [--device cpu|cuda] [--precision fp32|bf16|fp16]
    .venv/bin/python -m pytest bench/bench_ops.py  # the raw pytest-benchmark table (device from
                                                   # NSVIT_BENCH_DEVICE, dtype from NSVIT_BENCH_PRECISION)

Results go to bench/results/<device kind>/ops.{json,md} (ops-bf16.*, ops-fp16.* for the other
precisions): ``cpu`` or the GPU's name, so a GPU run never overwrites the CPU results or another
GPU's (``--out`` elsewhere). On the CPU the backends are torch and the compiled C++ extension
(``make ext``); Triton runs on the CPU only under its interpreter, far too slow to time, so it is
timed on CUDA only. pytest-benchmark times each backend's rounds in one block, not alternated
with the others': compare backends on an idle machine, and distrust differences of a few percent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from nsvit_fast import ops
from nsvit_fast.ops.dispatch import OPS
from nsvit_fast.runtime import device_kind

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEV = torch.device(os.environ.get("NSVIT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
PRECISION = os.environ.get("NSVIT_BENCH_PRECISION", "fp32")
RESULTS = Path(__file__).resolve().parent / "results"


def results_dir(dev: torch.device) -> Path:
    return RESULTS / device_kind(dev)


SIZES = {
    "prob_shift": {"digits M1": (1, 128, 10), "digits M8": (8, 128, 10), "ImageNet M1": (1, 128, 1000),
                   "ImageNet M8": (8, 64, 1000)},
    "nullspace_project": {"digits": (128, 32, 8, 96, True), "ViT-S/32": (32, 224, 32, 384, False),
                          "ViT-B/16": (32, 224, 16, 2, True)},
    "token_assembly": {"digits": (128, 16, 96, 1, 1), "ViT-S/32": (64, 49, 384, 1, 1), "ViT-B/16": (32, 196, 768, 1, 1)},
}


def backends_here(op: str) -> list[str]:
    skip = {"triton"} if DEV.type == "cpu" else set()  # the interpreter is not for timing
    return [b for b in OPS[op].impls if b not in skip and OPS[op].available[b](DEV)]


def make_case(op: str, size, dtype: torch.dtype | None = None):
    g = torch.Generator().manual_seed(0)
    dtype = dtype or PRECISIONS[PRECISION]
    r = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    if op == "prob_shift":
        m, b, k = size
        zn, zc = r(m, b, k).requires_grad_(True), r(b, k)
        return lambda backend: ops.prob_shift(zn, zc, 0.03, backend=backend)[0].sum().backward()
    if op == "nullspace_project":
        b, hw, p, k, keep = size
        q = torch.linalg.qr(torch.randn(3 * p * p, k, generator=g))[0].T.contiguous().to(DEV)  # fp32 basis
        x = r(b, 3, hw, hw).requires_grad_(True)
        return lambda backend: ops.nullspace_project(x, q, (p, p), keep, backend=backend).sum().backward()
    b, n, d, m, pfx = size
    u, v = r(b, n, d).requires_grad_(True), r(m, n, d).requires_grad_(True)
    pre, pos, w, bias = r(pfx, d).requires_grad_(True), r(pfx + n, d).requires_grad_(True), r(d), r(d)

    def run(backend):
        x, ln = ops.token_assembly(u, v, pre, pos, w, bias, 1e-6, True, True, backend=backend)
        (x.sum() + ln.sum()).backward()
    return run


CASES = [(op, name, be) for op, sizes in SIZES.items() for name in sizes for be in backends_here(op)]


@pytest.mark.parametrize("op,size,backend", CASES, ids=[f"{o}-{s}-{b}" for o, s, b in CASES])
def test_op(benchmark, op, size, backend):
    fn = make_case(op, SIZES[op][size])
    benchmark.group = f"{op} {size}"
    benchmark.extra_info.update(op=op, size=size, backend=backend, device=device_kind(DEV), precision=PRECISION)
    if DEV.type == "cuda":
        benchmark(lambda: (fn(backend), torch.cuda.synchronize(DEV)))  # DEV's queue: cuda:1 is not the current device
    else:
        benchmark(fn, backend)


def summarise(raw: dict) -> tuple[list[dict], str, str]:
    rows = []
    for bm in raw["benchmarks"]:
        e = bm["extra_info"]
        rows.append({"op": e["op"], "size": e["size"], "backend": e["backend"], "device": e["device"],
                     "precision": e.get("precision", "fp32"),
                     "median_ms": round(bm["stats"]["median"] * 1e3, 4), "rounds": bm["stats"]["rounds"]})
    base = {(r["op"], r["size"]): r["median_ms"] for r in rows if r["backend"] == "torch"}
    for r in rows:
        r["torch_over_backend"] = round(base[(r["op"], r["size"])] / r["median_ms"], 3)
    if DEV.type == "cuda":
        machine = f"{torch.cuda.get_device_name(DEV)}, torch {torch.__version__}"
    else:
        from common import cpu_line

        machine = f"{cpu_line()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    md = [f"Machine: {machine}. Inputs {PRECISION}. Forward + backward, median of pytest-benchmark rounds.", "",
          "| op | size | backend | median ms | speed-up over torch |", "|---|---|---|---|---|"]
    md += [f"| {r['op']} | {r['size']} | {r['backend']} | {r['median_ms']} | {r['torch_over_backend']} |" for r in rows]
    return rows, "\n".join(md) + "\n", machine


def main(argv=None) -> int:
    global DEV, PRECISION

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, when this file is imported by pytest
    from common import Parser, out_dir, write_results

    ap = Parser(description="op microbenchmarks, results under bench/results/<device kind>/")
    ap.add_argument("--device", default=str(DEV), help="cpu or cuda[:N] (default: cuda if there is one)")
    ap.add_argument("--precision", default=PRECISION, choices=sorted(PRECISIONS), help="input dtype")
    ap.add_argument("--out", type=out_dir, default=None,
                    help="folder for ops.json / .md (default bench/results/<device kind>)")
    args = ap.parse_args(argv)
    dev = ap.runtime(args.device).device  # a bad name, or CUDA where there is none, is one error line
    env = dict(os.environ, NSVIT_BENCH_DEVICE=str(dev), NSVIT_BENCH_PRECISION=args.precision)
    with tempfile.TemporaryDirectory() as d:
        raw_path = Path(d) / "raw.json"
        subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                        f"--benchmark-json={raw_path}", "--benchmark-min-rounds=10", "--benchmark-warmup=on"],
                       check=True, env=env)
        raw = json.loads(raw_path.read_text())
    DEV, PRECISION = dev, args.precision  # for summarise's labels
    rows, md, machine = summarise(raw)
    stem = "ops" if args.precision == "fp32" else f"ops-{args.precision}"
    out = args.out or results_dir(dev)
    write_results(out, stem, {"device": device_kind(dev), "machine": machine, "precision": args.precision,
                              "results": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
