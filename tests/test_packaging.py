"""Packaging: a non-editable wheel runs ``nsvit-fast finetune --config digits`` outside a checkout
(the configs ship as package data), and no module imports another package's private names."""

import ast
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def private_imports(root: Path, files) -> list[str]:
    """``from X import _name`` where X is an nsvit_fast module outside the importing file's own
    package (private modules such as the compiled ``_C`` are allowed: they have one user)."""
    bad = []
    for f in files:
        rel = f.relative_to(root)
        here = (["nsvit_fast"] + list(rel.parts[1:-1])) if rel.parts[0] == "nsvit_fast" else [rel.parts[0]]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = here[: len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
            else:
                base = (node.module or "").split(".")
            if base[0] != "nsvit_fast":
                continue
            target = root.joinpath(*base)
            for a in node.names:
                private = a.name.startswith("_") and not a.name.startswith("__")
                is_module = (target / f"{a.name}.py").exists() or list(target.glob(f"{a.name}.*.so"))
                if private and not is_module and base[:len(here)] != here:
                    bad.append(f"{rel}:{node.lineno}: from {'.'.join(base)} import {a.name}")
    return bad


def test_no_cross_package_private_imports():
    files = sorted((ROOT / "nsvit_fast").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    assert private_imports(ROOT, files) == []


def test_the_private_import_check_sees_one(tmp_path):
    (tmp_path / "nsvit_fast" / "eval").mkdir(parents=True)
    (tmp_path / "nsvit_fast" / "train").mkdir()
    (tmp_path / "nsvit_fast" / "train" / "engine.py").write_text("def _helper():\n    return 1\n")
    f = tmp_path / "nsvit_fast" / "eval" / "suite.py"
    f.write_text("from ..train.engine import _helper\nfrom . import _local\n")
    assert private_imports(tmp_path, [f]) == ["nsvit_fast/eval/suite.py:1: from nsvit_fast.train.engine import _helper"]


def build_wheel(dest: Path) -> Path:
    """A wheel built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    src = dest / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build", "dist")
    for name in ("nsvit_fast", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(dest / "dist"), str(src)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NSVIT_BUILD_EXT": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    wheels = list((dest / "dist").glob("nsvit_fast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_install_finetunes_digits_outside_the_checkout(tmp_path):
    whl = build_wheel(tmp_path)
    names = zipfile.ZipFile(whl).namelist()
    assert {"nsvit_fast/configs/digits.yaml", "nsvit_fast/assets/digits_vit.safetensors"} <= set(names)
    # a bare venv that sees this interpreter's dependencies as plain paths: no .pth of theirs runs, so
    # the editable install of the checkout is invisible and nsvit_fast can only come from the wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()["purelib"]])
    Path(purelib, "_deps_of_the_test_runner.pth").write_text("".join(f"{d}\n" for d in deps))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(whl)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    where = subprocess.run([str(py), "-c", "import nsvit_fast; print(nsvit_fast.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert where.stdout.strip().startswith(purelib), where.stdout + where.stderr
    work = tmp_path / "elsewhere"
    work.mkdir()
    cli = str(venv / "bin" / "nsvit-fast")
    budget = ["rounds=1", "model_steps=1", "batch_size=16", "max_images=96", "val_data=null", "synth.lim=3",
              "synth.lim_unit=abs", "synth.max_steps=20", "synth.batch_size=16", "synth.heldout=16"]
    r = subprocess.run([cli, "finetune", "--config", "digits", "--quiet", "--out", "run", *budget],
                       capture_output=True, text=True, timeout=600, env=env, cwd=work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "run" / "model.safetensors").is_file() and (work / "run" / "log.jsonl").is_file()
    bad = subprocess.run([cli, "finetune", "--config", "nope", "--out", "x"], capture_output=True, text=True,
                         timeout=300, env=env, cwd=work)
    assert bad.returncode == 2 and "nsvit-fast: error: config 'nope' not found" in bad.stderr
    assert "digits, digits_fast, vit_b_imagenet, vit_b_imagenet_fast, vit_s_imagenet, vit_s_imagenet_fast" in bad.stderr


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("base", ["digits", "vit_s_imagenet", "vit_b_imagenet"])
def test_fast_twin_differs_from_its_config_only_in_the_noise(base):
    """The README's promise: a `_fast` config is its base with the fast noise (warm_boundary, the
    norm cap of bench/results/noise_cost.md, round 0 on the boundary schedule, the floor growth of
    bench/results/grow_search*), nothing else."""
    from dataclasses import asdict

    from nsvit_fast.train.yamlcfg import load_run

    (run0, cfg0), (run1, cfg1) = load_run(base), load_run(f"{base}_fast")
    assert run0 == run1
    a, b = _flat(asdict(cfg0)), _flat(asdict(cfg1))
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert diff == {"noise_init": ("fresh", "warm_boundary"), "warm_max_growth": (0.0, 4.0),
                    "synth.schedule": ("paper", "boundary"), "synth.grow_search": ("secant", "floor")}
