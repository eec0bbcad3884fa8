"""Nullspace edits of images: watermarking (paper App. E) and targeted nullspace noise (App. F).

Both look for noise v that lies exactly in the patch-embedding nullspace N (so the model's tokens,
hence its outputs, do not change) and brings x + v close to a target image t:

    min ||x + v - t||  subject to  v in N (every patch),  x + v in [0, 1]

Without the box this is a least-squares problem with a closed form, v = P_N(t - x) (the
orthonormal basis makes it one projection). With it, Dykstra's alternating projections between
N and the box converge to the exact solution of the constrained problem; the returned v is the
last projection onto N, so invariance stays exact and the pixels may leave [0, 1] by a residual
that shrinks with the iterations (reported as ``box_violation``). Everything is batched over all
patches of all images through ``nsvit_fast.ops.nullspace_project``.
"""

from __future__ import annotations

import math

import torch

from ..errors import NsvitError, check_count, check_number, check_pixels
from ..nullspace import nullspace_basis


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def nullspace_edit(parts, x: torch.Tensor, target: torch.Tensor, iters: int = 100, box: bool = True):
    """The noise v in the nullspace N (every patch) that brings x + v closest to ``target``.

    Args:
        parts: the model's adapter.
        x, target: (B, C, H, W) pixels in [0, 1], the same shape.
        iters: Dykstra iterations between N and the box (ignored without ``box``).
        box: keep x + v in [0, 1]; without it, the closed form v = P_N(target - x).

    Returns:
        (v, violation): v (B, C, H, W) in ``x``'s dtype, exactly in N; violation the largest amount
        by which x + v leaves [0, 1] (0 without a box residual).

    Raises:
        NsvitError: pixels outside [0, 1] or not finite, shapes that differ, iters < 1 (with the
            box), a box that is not a bool, or a model without a patch-embedding nullspace.
    """
    check_pixels("image", x)
    check_pixels("target", target)
    if not isinstance(box, bool):  # box="no" is truthy
        raise NsvitError(f"box must be True or False, got {box!r}")
    if box:  # no iteration leaves the box unenforced, x + v outside [0, 1]
        iters = check_count("iters", iters)
    if x.shape != target.shape:
        raise NsvitError(f"image {tuple(x.shape)} and target {tuple(target.shape)} differ in size")
    from ..models import adapt

    adapt(parts).check_images(x)  # another size was refused only after the whole Dykstra loop
    basis = nullspace_basis(parts)
    if basis.dim == 0:
        raise NsvitError(f"{parts.name} has no patch-embedding nullspace (embed dim {basis.embed_dim} >= "
                         f"{basis.input_dim} = C*r*r): nothing to edit in")
    x64, d = x.double(), (target - x).double()
    z = basis.project(d)
    if box:
        y, p, q = d, torch.zeros_like(d), torch.zeros_like(d)
        for _ in range(iters):  # Dykstra: the projection of d onto N ∩ [-x, 1 - x]
            z = basis.project(y + p)
            p = y + p - z
            y = torch.minimum(torch.maximum(z + q, -x64), 1 - x64)
            q = z + q - y
    violation = float(torch.maximum((x64 + z - 1).clamp_min(0), (-(x64 + z)).clamp_min(0)).max())
    return z.to(x.dtype), violation


def max_rel(new: torch.Tensor, ref: torch.Tensor) -> float:
    """max |new - ref| / max |ref|: 0 when nothing moved, inf when only a zero reference did (a model
    whose output is constant 0 gave 0/0 = NaN, printed as a result)."""
    d, m = float((new - ref).abs().max()), float(ref.abs().max())
    return 0.0 if d == 0 else (d / m if m > 0 else math.inf)


@torch.no_grad()
def invariance(parts, x: torch.Tensor, edited: torch.Tensor) -> dict:
    u, ue = parts.patch_embed(x), parts.patch_embed(edited)
    z, ze = parts.encode(u), parts.encode(ue)
    return {"patch_embed_rel": max_rel(ue, u),
            "logits_rel": max_rel(ze, z),
            "predictions_match": float((z.argmax(-1) == ze.argmax(-1)).float().mean())}


def _quantised(img: torch.Tensor) -> torch.Tensor:
    return (img.clamp(0, 1) * 255).round() / 255


def watermark(parts, image: torch.Tensor, mark: torch.Tensor, strength: float = 0.5, iters: int = 100) -> dict:
    """Overlay ``mark`` on ``image`` through the nullspace (paper App. E).

    Args:
        parts: the model's adapter.
        image, mark: (B, C, H, W) pixels in [0, 1], the same shape (the model's input size).
        strength: weight of the mark in the target (1 - strength) image + strength mark, in (0, 1].
        iters: Dykstra iterations for the [0, 1] box.

    Returns:
        {"marked", "target", "noise": (B, C, H, W) tensors, "psnr_to_target", "psnr_to_image",
        "psnr_target_to_image" (dB), "box_violation", "float" and "png_8bit": {"patch_embed_rel",
        "logits_rel", "predictions_match"} for the float result and for it saved as 8 bits}.

    Raises:
        NsvitError: a strength outside (0, 1], a mark of another size, and as :func:`nullspace_edit`.
    """
    strength = check_number("strength", strength, lo=0, hi=1, lo_open=True)
    check_pixels("image", image)  # before mark.shape: a str or numpy mark raised a raw AttributeError
    check_pixels("mark", mark)
    if mark.shape != image.shape:
        raise NsvitError(f"the mark {tuple(mark.shape)} and the image {tuple(image.shape)} differ in size")
    target = (1 - strength) * image + strength * mark
    v, viol = nullspace_edit(parts, image, target, iters)
    marked = image + v
    q = _quantised(marked)
    return {"marked": marked, "target": target, "noise": v,
            "psnr_to_target": psnr(marked.clamp(0, 1), target), "psnr_to_image": psnr(marked.clamp(0, 1), image),
            "psnr_target_to_image": psnr(target, image), "box_violation": viol,
            "float": invariance(parts, image, marked), "png_8bit": invariance(parts, image, q)}


def targeted(parts, source: torch.Tensor, target: torch.Tensor, iters: int = 100) -> dict:
    """An image that looks like ``target`` to a person but gives the model ``source``'s output (App. F).

    Args:
        parts: the model's adapter.
        source, target: (B, C, H, W) pixels in [0, 1], the same shape (the model's input size).
        iters: Dykstra iterations for the [0, 1] box.

    Returns:
        {"result", "noise": (B, C, H, W) tensors (result = source + noise), "box_violation",
        "l2_result_to_target", "l2_source_to_target", "l2_result_to_source" (mean per image),
        "psnr_result_to_target", "logits_rel_to_source", "predictions_match_source",
        "png_8bit": the invariance numbers of the result saved as 8 bits}.

    Raises:
        NsvitError: as :func:`nullspace_edit`.
    """
    v, viol = nullspace_edit(parts, source, target, iters)
    result = source + v
    with torch.no_grad():
        zs, zr = parts(source), parts(result)
    return {"result": result, "noise": v, "box_violation": viol,
            "l2_result_to_target": float((result - target).flatten(1).norm(dim=1).mean()),
            "l2_source_to_target": float((source - target).flatten(1).norm(dim=1).mean()),
            "l2_result_to_source": float((result - source).flatten(1).norm(dim=1).mean()),
            "psnr_result_to_target": psnr(result.clamp(0, 1), target),
            "logits_rel_to_source": max_rel(zr, zs),
            "predictions_match_source": float((zr.argmax(-1) == zs.argmax(-1)).float().mean()),
            "png_8bit": invariance(parts, source, _quantised(result))}
