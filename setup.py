"""Packaging. Metadata lives in pyproject.toml; this file maps the layout and builds the optional
compiled ops.

- ``kernels/`` (Triton, top level per the design card) installs as ``nsvit_fast.kernels``, so there
  is never a top-level module named ``kernels``.
- ``csrc/`` builds the torch extension ``nsvit_fast._C`` only when asked, with torch already
  installed (no build isolation): ``NSVIT_BUILD_EXT=cpu`` (C++ / OpenMP) or ``NSVIT_BUILD_EXT=cuda``
  (adds the CUDA sources; needs nvcc and CUDA_HOME). ``make ext`` and ``make cuda-check`` do it.
  The package works without it: ``nsvit_fast.ops`` falls back to torch.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).resolve().parent
packages = find_packages(include=["nsvit_fast", "nsvit_fast.*"])
package_dir = {"": "."}
if (here / "kernels" / "__init__.py").is_file():
    packages.append("nsvit_fast.kernels")
    package_dir["nsvit_fast.kernels"] = "kernels"

ext_modules, cmdclass = [], {}
mode = os.environ.get("NSVIT_BUILD_EXT", "").lower()
if mode in ("cpu", "cuda"):
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp"]  # torch adds its own -std (C++20 for torch 2.14)
    if mode == "cuda":
        # torch's CUDA wheels bring the CUDA library headers (cusparse.h, cublas...) as nvidia/* packages;
        # a minimal toolkit (nvcc only) lacks them
        import torch

        site = Path(torch.__file__).resolve().parent.parent / "nvidia"
        inc = [str(d) for d in sorted(site.glob("*/include"))]
        lib = [str(d) for d in sorted(site.glob("*/lib"))]
        ext_modules.append(CUDAExtension(
            "nsvit_fast._C", ["csrc/ops.cpp", "csrc/ops_cuda.cu"], define_macros=[("WITH_CUDA", None)],
            include_dirs=inc, library_dirs=lib,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=["-fopenmp"]))
    else:
        ext_modules.append(CppExtension("nsvit_fast._C", ["csrc/ops.cpp"], extra_compile_args=cxx,
                                        extra_link_args=["-fopenmp"]))
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=False)

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"nsvit_fast": ["assets/*.safetensors", "configs/*.yaml"]},  # configs: --config digits anywhere
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
