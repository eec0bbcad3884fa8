"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, with no GPU: the launches the
autograd Functions really make (digits, ViT-B/16 and ViT-S/32 shapes; fp32, bf16, fp16), through Triton's
compiler and bundled ptxas (nsvit_fast.kernels.aot). A cubin for each, no register spills. The
interpreter that runs the other Triton tests on the CPU accepts code the compiler rejects (tl.dot
tiles under 16, a non-constexpr where one is needed, ...): this test is where that fails."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

KERNEL_FILES = ["prob_shift.py", "nullspace_projection.py", "token_assembly.py"]
if os.environ.get("NSVIT_REQUIRE_TRITON") != "1":
    pytest.importorskip("triton")


def jit_kernels() -> set[str]:
    """Names of the launched @triton.jit kernels in the kernel files (read from source: in this
    process they are interpreter objects). A jit function called as ``name(...)`` from another
    kernel is a device helper, inlined into its callers and compiled with them."""
    root = Path(__file__).resolve().parent.parent / "kernels"
    names = set()
    for f in KERNEL_FILES:
        text = (root / f).read_text()
        for m in re.findall(r"@triton\.jit\s*\ndef (\w+)", text):
            if not re.search(rf"(?<!def ){m}\(", text):
                names.add(m)
    return names


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # fresh: every kernel really compiles
    report_path = tmp_path / "aot.json"
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "nsvit_fast.kernels.aot", "--arch", "80", "90",
                          "--json", str(report_path)], env=env, capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - t
    assert run.returncode == 0, f"AOT compile failed ({seconds:.0f} s):\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
    report = json.loads(report_path.read_text())
    assert not report["failed"]
    compiled = report["compiled"]
    # every kernel of every op file, for both targets, in every dtype at every shape
    assert set(report["kernels"]) == jit_kernels()
    for arch in (80, 90):
        assert {c["kernel"] for c in compiled if c["arch"] == arch} == jit_kernels()
        for where in ("digits fp32", "digits bf16", "digits fp16", "ViT-B/16 fp32", "ViT-B/16 bf16",
                      "ViT-B/16 fp16", "ViT-S/32 fp32", "ViT-S/32 bf16", "ViT-S/32 fp16"):
            assert any(c["arch"] == arch and c["where"] == where for c in compiled), (arch, where)
        # D = 384 (ViT-S): the BLOCK_D = 512 token-assembly variants; 1000 classes: prob_shift's BLOCK_K = 1024
        assert any(c["arch"] == arch and c["kernel"] == "_assemble_fwd" and "BLOCK_D=512" in c["constexprs"]
                   for c in compiled), arch
        assert any(c["arch"] == arch and c["kernel"] == "_rows_kernel" and "BLOCK_K=1024" in c["constexprs"]
                   for c in compiled), arch
    for c in compiled:
        assert c["cubin_bytes"] > 0, c
        assert c["spill_stores"] == 0 and c["spill_loads"] == 0, c
