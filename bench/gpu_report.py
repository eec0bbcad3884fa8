"""GPU report: one command on a machine with a CUDA GPU runs every benchmark there and writes one
report under bench/results/<device kind>/ (the GPU's name: a CPU result or another GPU's is never
overwritten).

    make ext-cuda   # or NSVIT_BUILD_EXT=cuda .venv/bin/python setup.py build_ext --inplace
    .venv/bin/python bench/gpu_report.py [--precision fp32 bf16] [--repeats 5]

It runs, each as its own process:
- bench/bench_ops.py --device cuda --precision P for each precision: every backend (torch, triton,
  cuda), forward + backward;
- the achieved bandwidth of each op and backend against the device's own copy bandwidth;
- bench/bench_synth.py and bench/bench_finetune.py --device cuda --precision P for each precision;
- bench/bench_precision.py --device cuda --precisions fp32,...: the ns finetuning and synthesis
  step times of each precision against fp32, interleaved in one process;
- bench/bench_loader.py --device cuda --no-rss: the streaming loader's images/s against what one ns
  step of ViT-S/16 consumes (peak RSS is host memory, measured on the CPU).

Every script resolves the device through nsvit_fast.runtime and writes its own files under the
same bench/results/<device kind>/ folder as this report.

Refuses to run without CUDA (exit status 2): no GPU figure without a GPU run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


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


def bytes_moved(op: str, size, itemsize: int = 4) -> int:
    """Bytes an ideal kernel reads and writes, forward + backward (inputs of ``itemsize`` bytes;
    gradients the ops keep in fp32 counted at 4)."""
    if op == "prob_shift":
        m, b, k = size
        return itemsize * (m * b * k + b * k) + 4 * 2 * m * b * k + itemsize * m * b * k  # read, grad w/r, grad out
    if op == "nullspace_project":
        b, hw, p, k, _ = size
        return itemsize * 4 * b * 3 * hw * hw  # read + write images, forward and backward
    b, n, d, m, pfx = size
    rows = b * (1 + m)
    return itemsize * (rows * (pfx + n) * d * 4 + b * n * d * 2) + 4 * rows * (pfx + n) * d * 2  # x, ln, grads; g


def bandwidth_table(precision: str, reps: int = 20) -> list[str]:
    sys.path.insert(0, str(HERE))
    import bench_ops

    bench_ops.DEV, bench_ops.PRECISION = torch.device("cuda"), precision
    itemsize = torch.empty(0, dtype=bench_ops.PRECISIONS[precision]).element_size()
    bw = copy_bandwidth_gbs()
    lines = [f"Copy bandwidth: {bw:.0f} GB/s. Inputs {precision}; forward + backward, mean of {reps} after 3 "
             "warm-up.", "",
             "| op | size | backend | ms | GB/s | % of copy |", "|---|---|---|---|---|---|"]
    for op, sizes in bench_ops.SIZES.items():
        for name, size in sizes.items():
            for be in bench_ops.backends_here(op):
                fn = bench_ops.make_case(op, size)
                for _ in range(3):
                    fn(be)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(reps):
                    fn(be)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t) / reps * 1e3
                gbs = bytes_moved(op, size, itemsize) / (ms / 1e3) / 1e9
                lines.append(f"| {op} | {name} | {be} | {ms:.3f} | {gbs:.1f} | {100 * gbs / bw:.1f}% |")
    return lines


def run(cmd: list[str]) -> tuple[int, str]:
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(p.stdout[-4000:], p.stderr[-2000:], sep="\n", flush=True)
    return p.returncode, p.stdout


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    from common import Parser, count

    ap = Parser(description="all benchmarks on this CUDA machine, one report")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--repeats", type=count(1), default=5, help="repeats for bench_synth / bench_finetune / bench_precision")
    args = ap.parse_args(argv)
    if len(set(args.precision)) != len(args.precision):  # bench_precision refused it, after the other runs
        ap.error(f"--precision names {next(p for p in args.precision if args.precision.count(p) > 1)} twice")
    if not torch.cuda.is_available():
        ap.error("no CUDA device here; run it on a GPU machine")
    from bench_ops import results_dir

    from nsvit_fast.io import write_text

    out_dir = results_dir(torch.device("cuda"))
    name = torch.cuda.get_device_name()
    report = [f"# GPU report: {name}", "", f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"capability {'.'.join(map(str, torch.cuda.get_device_capability()))}.", ""]
    failed = []
    for precision in args.precision:
        rc, _ = run([sys.executable, str(HERE / "bench_ops.py"), "--device", "cuda", "--precision", precision])
        stem = "ops" if precision == "fp32" else f"ops-{precision}"
        report += [f"## Ops, {precision} (bench_ops.py)", ""]
        if rc == 0:
            report += [(out_dir / f"{stem}.md").read_text(), "### Achieved bandwidth", ""]
            report += bandwidth_table(precision) + [""]
        else:
            failed.append(f"bench_ops {precision}")
            report += [f"bench_ops.py --precision {precision} failed (exit {rc}).", ""]
    for script, extra in (("bench_synth.py", ["--repeats", str(args.repeats)]),
                          ("bench_finetune.py", ["--repeats", str(args.repeats)])):
        report += [f"## {script}", ""]
        for precision in args.precision:
            rc, stdout = run([sys.executable, str(HERE / script), "--device", "cuda", "--precision", precision, *extra])
            if rc:
                failed.append(f"{script} {precision}")
            report += [f"### {precision} (exit {rc})", "", "```", stdout.strip()[-6000:], "```", ""]
    precisions = ["fp32"] + [p for p in args.precision if p != "fp32"]
    rc, stdout = run([sys.executable, str(HERE / "bench_precision.py"), "--device", "cuda", "--precisions",
                      ",".join(precisions), "--repeats", str(args.repeats)])
    if rc:
        failed.append("bench_precision.py")
    report += ["## bench_precision.py: step time against fp32", "", f"(exit {rc})", "", stdout.strip()[-6000:], ""]
    # the loader against the ns step it feeds; RSS is a host-memory question the CPU results answer
    rc, stdout = run([sys.executable, str(HERE / "bench_loader.py"), "--device", "cuda", "--no-rss"])
    if rc:
        failed.append("bench_loader.py")
    report += ["## bench_loader.py: images/s against the ns step's", "", f"(exit {rc})", "", stdout.strip()[-6000:], ""]
    path = write_text(out_dir / "gpu_report.md", "\n".join(report) + "\n")
    print(f"written: {path}")
    if failed:
        print(f"gpu_report: error: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
