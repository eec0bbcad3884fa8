"""The console script end to end, in a subprocess as a user runs it."""

import json
import subprocess
import sys

import pytest

from nsvit_fast.cli import build_parser


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nsvit_fast", *args], capture_output=True, text=True,
                          timeout=timeout, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_help_on_every_subcommand():
    parser = build_parser()
    names = list(parser._subparsers._group_actions[0].choices)
    assert {"nullspace", "pretrain", "demo"} <= set(names)
    for name in names:
        r = run(name, "--help")
        assert r.returncode == 0 and "usage: nsvit-fast " + name in r.stdout


def test_nullspace_json_vit_small_patch32():
    r = run("nullspace", "--model", "vit_small_patch32_224", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"model": "vit_small_patch32_224", "patch_size": 32, "input_dim": 3072, "embed_dim": 384,
                   "rank": 384, "nullspace_dim": 2688}


@pytest.mark.parametrize("args,msg", [
    (("nullspace", "--model", "resnet18"), "not a supported family"),
    (("nullspace", "--model", "vit_tiny_patch16_224", "--checkpoint", "/nonexistent.safetensors"), "not found"),
    (("nullspace", "--model", "vit_smal_patch32_224"), "unknown timm model"),
    (("nullspace",), "give --model"),
    (("pretrain", "--epochs", "0"), "epochs must be"),
    (("nullspace", "--model", "vit_tiny_patch16_224", "--pretrained"), "could not get pretrained"),
])
def test_user_errors_exit_2_with_one_line(args, msg):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsvit-fast: error:") and msg in lines[0], r.stderr


def test_demo_writes_figure_and_report(tmp_path):
    r = run("demo", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "demo.json").read_text())
    assert out["test_accuracy"] >= 0.97
    assert out["nullspace"]["nullspace_dim"] == 96
    assert out["invariance_float32"]["predictions_match"] == 1.0
    assert out["invariance_float32"]["logits_rel"] <= 1e-5
    assert out["invariance_float64"]["logits_rel"] <= 1e-10
    assert out["invariance_float32"]["noise_to_image_norm"] >= 9.99
    png = (tmp_path / "fig2_nullspace_noise.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "nullspace dim" in (tmp_path / "report.md").read_text()
