"""The exact patch-embedding nullspace: Table 1, basis, projection, sampling and invariance."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nsvit_fast import NsvitError, load_model, nullspace_basis, verify_invariance
from nsvit_fast.nullspace import TABLE1, patchify, unpatchify


def test_table1_from_the_command_line():
    # `nsvit-fast nullspace --table1`: randomly initialised weights are full rank, so C*r*r - D
    # where positive, as the paper reports; one process for all eight models (the SVDs dominate)
    r = subprocess.run([sys.executable, "-m", "nsvit_fast", "nullspace", "--table1", "--json"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["model"], x["paper"]) for x in rows] == TABLE1
    for x in rows:
        assert x["rank"] + x["nullspace_dim"] == x["input_dim"] == 3 * x["patch_size"] ** 2
        if x["model"] != "vit_base_patch16_224":
            assert x["nullspace_dim"] == max(0, x["input_dim"] - x["embed_dim"]) == x["paper"]
        else:  # square map: only a numerical deficit, see below
            assert x["input_dim"] == x["embed_dim"] and x["nullspace_dim"] <= 2


def test_table1_square_map_counts_the_singular_values_under_the_tolerance():
    # vit_base_patch16_224 (768 = 768; paper: 2 from pretrained weights): only numerical rank deficits;
    # the count is exactly the singular values under the tolerance
    torch.manual_seed(0)
    ns = nullspace_basis(load_model("vit_base_patch16_224", depth=1))  # depth does not touch the patch embedding
    s = ns.singular_values
    assert ns.input_dim == ns.embed_dim and ns.dim == int((s <= s[0] * ns.rtol).sum()) <= 2
    assert nullspace_basis(load_model("vit_base_patch16_224", depth=1), rtol=0.0).dim == 0


def test_basis_is_orthonormal_and_in_the_kernel(digits_parts):
    ns = nullspace_basis(digits_parts)
    b, r = ns.basis, ns.row_basis
    assert b.dtype == torch.float64 and b.shape == (96, 192) and r.shape == (96, 192)
    eye = torch.eye(96, dtype=torch.float64)
    assert torch.allclose(b @ b.T, eye, atol=1e-12)
    assert (b @ r.T).abs().max() < 1e-12
    w, _ = digits_parts.patch_projection()
    w = w.detach().double().reshape(w.shape[0], -1)
    assert (w @ b.T).abs().max() / w.abs().max() < 1e-12


def test_projection_idempotent_and_orthogonal_to_row_space(digits_parts):
    ns = nullspace_basis(digits_parts)
    x = torch.rand(5, 3, 32, 32, dtype=torch.float64)
    p = ns.project(x)
    assert torch.allclose(ns.project(p), p, atol=1e-12)
    assert (patchify(p, ns.patch_size) @ ns.row_basis.T).abs().max() < 1e-12
    assert torch.allclose(p + ns.project(x, complement=True), x, atol=1e-12)


def test_projection_uses_either_basis_consistently():
    # ViT-S/32 (nullspace 2688 > rank 384) goes through the row basis, digits through the null basis
    ns = nullspace_basis(load_model("vit_small_patch32_224", depth=1))
    x = torch.rand(2, 3, 224, 224, dtype=torch.float64)
    direct = unpatchify(patchify(x, ns.patch_size) @ ns.basis.T @ ns.basis, 3, (7, 7), ns.patch_size)
    assert torch.allclose(ns.project(x), direct, atol=1e-10)


def test_patchify_matches_conv_layout(digits_parts):
    # a patch flattened by patchify, times the flattened conv weight, equals the conv output
    x = torch.rand(2, 3, 32, 32)
    w, b = digits_parts.patch_projection()
    via_mat = patchify(x, (8, 8)) @ w.reshape(96, -1).T + b
    via_conv = torch.nn.functional.conv2d(x, w, b, stride=8).flatten(2).transpose(1, 2)
    assert torch.allclose(via_mat, via_conv, atol=1e-5)
    assert torch.equal(unpatchify(patchify(x, (8, 8)), 3, (4, 4), (8, 8)), x)


def test_invariance_float64(digits_parts, digits_test):
    ns = nullspace_basis(digits_parts)
    x = digits_test.images[:64].double()
    v = ns.sample(64, norm=1.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = v * 10 * x.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    parts64 = load_model("digits_vit").double()
    inv = verify_invariance(parts64, x, v)
    assert inv["noise_to_image_norm"] >= 10 - 1e-9
    assert inv["patch_embed_rel"] <= 1e-10 and inv["logits_rel"] <= 1e-10
    assert inv["predictions_match"] == 1.0


def test_invariance_float32(digits_parts, digits_test):
    ns = nullspace_basis(digits_parts)
    x = digits_test.images[:128]
    v = ns.sample(128, norm=1.0, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = (v * 10 * x.double().flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)).float()
    inv = verify_invariance(digits_parts, x, v)
    assert inv["noise_to_image_norm"] >= 10 - 1e-4
    assert inv["logits_rel"] <= 1e-5 and inv["predictions_match"] == 1.0
    # the same norm in a random direction moves the logits a lot: the check can fail
    rnd = torch.randn_like(v)
    rnd = rnd * (v.flatten(1).norm(dim=1) / rnd.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    assert verify_invariance(digits_parts, x, rnd)["logits_rel"] > 0.1


def test_pixel_space_nullspace_with_per_channel_std():
    # DeiT normalises with different stds per channel: the raw conv weight's nullspace is then
    # NOT invariant for pixel noise, the pixel-space one (weight / std) is
    torch.manual_seed(0)
    parts = load_model("deit_tiny_patch16_224", depth=1).double()
    ns = nullspace_basis(parts)
    x = torch.rand(2, 3, 224, 224, dtype=torch.float64)
    v = ns.sample(2, norm=200.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert verify_invariance(parts, x, v)["patch_embed_rel"] < 1e-10
    w = parts.model.patch_embed.proj.weight.detach().reshape(192, -1)
    raw = torch.linalg.svd(w, full_matrices=True)[2][192:]
    vr = unpatchify(torch.randn(2, 196, raw.shape[0], dtype=torch.float64) @ raw, 3, (14, 14), (16, 16))
    vr = vr * (200.0 / vr.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
    assert verify_invariance(parts, x, vr)["patch_embed_rel"] > 1e-3


def test_sample_and_coefficients(digits_parts):
    ns = nullspace_basis(digits_parts)
    v = ns.sample(3, norm=7.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert v.shape == (3, 3, 32, 32)
    assert torch.allclose(v.flatten(1).norm(dim=1), torch.full((3,), 7.0, dtype=torch.float64))
    coef = ns.coefficients(v)
    assert coef.shape == (3, 16, 96)
    assert torch.allclose(ns.from_coefficients(coef, (4, 4)), v, atol=1e-12)
    # least squares: for any target difference, from_coefficients(coefficients(d)) is its projection
    d = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(ns.from_coefficients(ns.coefficients(d), (4, 4)), ns.project(d), atol=1e-12)


def test_rank_tolerance_is_configurable(digits_parts):
    ns = nullspace_basis(digits_parts)
    s = ns.singular_values
    # a tolerance just above the smallest singular value drops one rank
    ns2 = nullspace_basis(digits_parts, rtol=float(s[-1] / s[0]) * 1.0001)
    assert ns2.rank == ns.rank - 1 and ns2.dim == ns.dim + 1


def test_nullspace_bad_input(digits_parts):
    ns = nullspace_basis(digits_parts)
    with pytest.raises(NsvitError, match="not a multiple of the patch size"):
        ns.project(torch.rand(1, 3, 30, 30))
    with pytest.raises(NsvitError, match="expected float images"):
        ns.project(torch.rand(1, 1, 32, 32))
    no_null = nullspace_basis(load_model("vit_base_patch8_224", depth=1))
    with pytest.raises(NsvitError, match="no nullspace"):
        no_null.sample(1)
    with pytest.raises(NsvitError, match="noise"):
        verify_invariance(digits_parts, torch.rand(2, 3, 32, 32), torch.rand(1, 3, 32, 32))


def test_nullspace_api_refuses_what_it_would_answer_wrongly(digits_parts):
    # each of these returned a value before: zeros, the wrong norm, the whole patch space as "null"
    ns = nullspace_basis(digits_parts)
    x = torch.rand(2, 3, 32, 32)
    v = ns.sample(2, norm=5.0)
    assert torch.allclose(v.flatten(1).norm(dim=1), torch.tensor([5.0, 5.0]))
    bad = [
        (lambda: ns.project((x * 255).to(torch.uint8)), "expected float images .B, 3, H, W., got uint8"),
        (lambda: ns.coefficients(x.long()), "got int64"),
        (lambda: ns.from_coefficients(ns.coefficients(x).long(), (4, 4)), "coefficients must be a float tensor"),
        (lambda: ns.from_coefficients(ns.coefficients(x), (2, 2)), r"\(B, 4, 96\) for grid \(2, 2\)"),
        (lambda: ns.sample(2, norm=-5.0), "norm must be a finite number > 0"),
        (lambda: ns.sample(2, norm=float("nan")), "norm must be"),
        (lambda: ns.sample(2, norm=True), "norm must be"),
        (lambda: ns.sample(0, norm=1.0), "n must be >= 1"),
        (lambda: ns.sample(2.5), "n must be a whole number"),
        (lambda: ns.sample(2, norm=1.0, img_size=(4, 4)), "holds no whole 8x8 patch"),
        (lambda: ns.sample(2, img_size=32), "img_size must be a pair"),
        (lambda: ns.sample(2, dtype=torch.int64), "dtype must be a torch float dtype"),
        (lambda: ns.sample(2, generator=42), "generator must be a torch.Generator"),
        (lambda: nullspace_basis(digits_parts, rtol=float("nan")), r"rtol must be a finite number in \[0, 1\)"),
        (lambda: nullspace_basis(digits_parts, rtol=1.0), "rtol must be"),
        (lambda: nullspace_basis(digits_parts, rtol="0.1"), "rtol must be a number"),
        (lambda: verify_invariance(digits_parts, x * 255, v), r"must be pixels in \[0, 1\]"),
        (lambda: verify_invariance(digits_parts, x[:0], v[:0]), "images is empty"),
        (lambda: verify_invariance(digits_parts, x, v.numpy()), "noise must be a float tensor"),
        (lambda: verify_invariance(digits_parts, x, v * float("nan")), "noise holds"),
    ]
    for call, msg in bad:
        with pytest.raises(NsvitError, match=msg):
            call()
