"""Packaging. Metadata lives in pyproject.toml; this file maps the package layout.

``kernels/`` (Triton, top level per the design card) is installed as ``nsvit_fast.kernels`` so
that there is never a top-level module named ``kernels``.
"""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).resolve().parent
packages = find_packages(include=["nsvit_fast", "nsvit_fast.*"])
package_dir = {"": "."}
if (here / "kernels" / "__init__.py").is_file():
    packages.append("nsvit_fast.kernels")
    package_dir["nsvit_fast.kernels"] = "kernels"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"nsvit_fast": ["assets/*.safetensors", "configs/*.yaml"]},
    include_package_data=True,
)
