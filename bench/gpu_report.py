"""GPU report: on a machine with a CUDA GPU, the op benchmarks for every backend (torch, triton,
cuda) and the synthesis benchmark, in one table, with the achieved bandwidth of the memory-bound
ops against the device's own copy bandwidth.

    make ext-cuda   # or NSVIT_BUILD_EXT=cuda .venv/bin/python setup.py build_ext --inplace
    .venv/bin/python bench/gpu_report.py

Not run by this project's CI or on its CPU-only machines (it refuses to run without CUDA); its
numbers belong next to the CPU results in the README once measured on a GPU.
"""

from __future__ import annotations

import sys
import time

import torch


def copy_bandwidth_gbs(nbytes: int = 1 << 28) -> float:
    x = torch.empty(nbytes // 4, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * nbytes * 20 / (time.perf_counter() - t) / 1e9


def bytes_moved(op: str, size) -> int:
    """Bytes an ideal kernel reads and writes (fp32), forward + backward."""
    if op == "prob_shift":
        m, b, k = size
        return 4 * (m * b * k * 3 + b * k)  # read noisy (fwd), write grad, read grad (bwd), read clean
    if op == "nullspace_project":
        b, hw, p, k, _ = size
        return 4 * 4 * b * 3 * hw * hw  # read + write images, forward and backward
    b, n, d, m, pfx = size
    rows = b * (1 + m)
    return 4 * (rows * (pfx + n) * d * 6 + b * n * d * 2)  # x, ln out; grads in; g; u and v


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_report: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    import bench_ops  # noqa: E402  (same folder)
    from bench_ops import SIZES, backends_here, make_case

    bw = copy_bandwidth_gbs()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.0f} GB/s")
    print(f"{'op':18s} {'size':12s} {'backend':8s} {'ms':>9s} {'GB/s':>8s} {'% of copy':>9s}")
    for op, sizes in SIZES.items():
        for name, size in sizes.items():
            for be in backends_here(op):
                fn = make_case(op, size)
                for _ in range(3):
                    fn(be)
                torch.cuda.synchronize()
                t = time.perf_counter()
                reps = 20
                for _ in range(reps):
                    fn(be)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t) / reps * 1e3
                gbs = bytes_moved(op, size) / (ms / 1e3) / 1e9
                print(f"{op:18s} {name:12s} {be:8s} {ms:9.3f} {gbs:8.1f} {100 * gbs / bw:8.1f}%")
    del bench_ops
    import bench_synth

    sys.argv = [sys.argv[0], "--repeats", "5"]
    bench_synth.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
