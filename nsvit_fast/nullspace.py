"""The exact nullspace of the patch embedding (paper Sec. 3.1, Table 1).

The patch projection maps each flattened patch p (C*r*r values, in pixel space) to W p + b with
W of shape (D, C*r*r). Any p in null(W) leaves every patch token, hence the whole model's
output, unchanged. The basis comes from the SVD of the *whole* flattened W in float64, not per
colour channel as the official code did (which finds only a sub-space).

Pixel space: the adapter normalises inside the model, so W here is the conv weight divided by the
per-channel std. Its nullspace has the same dimension as the raw weight's, but it is the one that
leaves outputs unchanged when noise is added to pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from . import ops
from .errors import FLOAT_DTYPES, NsvitError, check_count, check_finite, check_number, check_pixels, check_positive
from .models.loading import load_model
from .models.registry import adapt
from .ops import patchify, unpatchify


def default_rtol(shape: tuple[int, int]) -> float:
    """Rank tolerance relative to sigma_max: max(m, n) * float32 machine epsilon.

    The weights are float32, so singular values below that are float32 round-off, not rank."""
    return max(shape) * torch.finfo(torch.float32).eps


@dataclass
class PatchNullspace:
    """Orthonormal bases of null(W) and of its complement, the row space of W.

    Attributes:
        basis: (k, n) float64, orthonormal rows spanning null(W), n = C*r*r.
        row_basis: (rank, n) float64, orthonormal rows spanning the row space.
        singular_values: (min(D, n),) float64, descending.
        rtol: rank tolerance relative to the largest singular value.
        in_chans, patch_size, embed_dim: C, (r_h, r_w) and D of the patch embedding.
        img_size: the model's input size (H, W), the default of :meth:`sample`; None if unknown.

    Built by :func:`nullspace_basis`; all methods take and return tensors on the input's device
    and dtype (the bases are cast to it).
    """

    basis: torch.Tensor
    row_basis: torch.Tensor
    singular_values: torch.Tensor
    rtol: float
    in_chans: int
    patch_size: tuple[int, int]
    embed_dim: int
    img_size: tuple[int, int] | None = None

    @property
    def dim(self) -> int:
        """k, the nullspace dimension (the paper's Table 1 column)."""
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        """The rank of W under ``rtol``; ``dim + rank == input_dim``."""
        return self.row_basis.shape[0]

    @property
    def input_dim(self) -> int:
        """n = C * r_h * r_w, the length of a flattened patch."""
        return self.basis.shape[1]

    def summary(self, model: str = "") -> dict:
        """One row of the Table 1 layout: model, patch_size (an int when square), input_dim,
        embed_dim, rank, nullspace_dim (JSON-ready)."""
        r = self.patch_size
        return {"model": model, "patch_size": r[0] if r[0] == r[1] else list(r), "input_dim": self.input_dim,
                "embed_dim": self.embed_dim, "rank": self.rank, "nullspace_dim": self.dim}

    # -- projections --
    def _mat(self, which: str, like: torch.Tensor) -> torch.Tensor:
        m = self.basis if which == "null" else self.row_basis
        return m.to(device=like.device, dtype=like.dtype)

    def project_patches(self, p: torch.Tensor, complement: bool = False) -> torch.Tensor:
        """Project flattened patches (..., n) onto null(W) (or, with complement, the row space).

        Uses the smaller of the two bases: P_null p = B^T B p = p - R^T R p. Returns (..., n).
        Raises NsvitError when the last dimension is not ``input_dim``."""
        if p.shape[-1] != self.input_dim:
            raise NsvitError(f"patches have {p.shape[-1]} values, the nullspace lives in {self.input_dim}")
        small_is_null = self.dim <= self.rank
        which = "null" if small_is_null else "row"
        m = self._mat(which, p)
        part = (p @ m.T) @ m
        return part if small_is_null != complement else p - part

    def project(self, images: torch.Tensor, complement: bool = False) -> torch.Tensor:
        """Project every non-overlapping patch of images (B, C, H, W) onto null(W); returns (B, C, H, W).

        All patches of all images go through one op (``nsvit_fast.ops.nullspace_project``: fused
        patchify / products / unpatchify; no Python loop over patches), differentiable w.r.t. images.
        Raises NsvitError for images that are not (B, C, H, W) with the model's C, or whose size is
        not a multiple of the patch."""
        self._check_images(images)
        if images.shape[2] % self.patch_size[0] or images.shape[3] % self.patch_size[1]:
            raise NsvitError(f"image size {images.shape[2]}x{images.shape[3]} is not a multiple of the patch size "
                             f"{self.patch_size[0]}x{self.patch_size[1]}")
        small_is_null = self.dim <= self.rank
        q = self.basis if small_is_null else self.row_basis
        return ops.nullspace_project(images, q.to(images.device), self.patch_size, keep=small_is_null != complement)

    def coefficients(self, images: torch.Tensor) -> torch.Tensor:
        """Least-squares coefficients (B, P, k) of each patch of images (B, C, H, W) in the basis.

        The basis is orthonormal, so the least-squares solution of min ||B^T c - p|| is c = B p.
        P = (H / r_h) * (W / r_w) in row-major grid order. Raises NsvitError for images that are
        not (B, C, H, W) with the model's C, or whose size is not a multiple of the patch."""
        self._check_images(images)
        return patchify(images, self.patch_size) @ self._mat("null", images).T

    def from_coefficients(self, coef: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, P, k) coefficients -> nullspace images (B, C, g_h * r_h, g_w * r_w) on the
        ``grid`` (g_h, g_w) of patches, P = g_h * g_w; the inverse of :meth:`coefficients` on null(W).
        Raises NsvitError for coefficients that are not a float (B, P, k) tensor or a bad grid."""
        grid = _check_grid("grid", grid)
        want = (grid[0] * grid[1], self.dim)
        if not isinstance(coef, torch.Tensor) or not coef.is_floating_point() or coef.dim() != 3 \
                or tuple(coef.shape[1:]) != want:
            got = f"{str(coef.dtype).replace('torch.', '')} {tuple(coef.shape)}" if isinstance(coef, torch.Tensor) \
                else type(coef).__name__
            raise NsvitError(f"coefficients must be a float tensor (B, {want[0]}, {want[1]}) for grid {grid}, got {got}")
        return unpatchify(coef @ self._mat("null", coef), self.in_chans, grid, self.patch_size)

    def sample(self, n: int, norm: float | None = None, *, img_size: tuple[int, int] | None = None,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """n random nullspace images (n, C, H, W): Gaussian coefficients for every patch, each image
        scaled to Frobenius norm ``norm`` if given.

        Args:
            n: how many images.
            norm: the L2 norm of each image (pixel units); None leaves the Gaussian scale.
            img_size: (H, W); defaults to the model's ``img_size``. A size that is not a multiple
                of the patch leaves the remainder out: the images are (n, C, g_h * r_h, g_w * r_w)
                with g_h = H // r_h, g_w = W // r_w.
            generator: for reproducible draws (CPU).
            dtype: of the result (computed in float64).

        Raises:
            NsvitError: the patch embedding has no nullspace (dim 0), no image size is known, n is not
                a whole number >= 1, norm is not a finite number > 0, an image size under one
                patch, or a dtype that is not a float type.
        """
        n = check_count("n", n)
        if norm is not None:
            norm = check_positive("norm", norm)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise NsvitError(f"dtype must be a torch float dtype, got {dtype!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise NsvitError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if self.dim == 0:
            raise NsvitError(f"the patch embedding has no nullspace (embed dim {self.embed_dim} >= "
                             f"input dim {self.input_dim}, rank {self.rank})")
        hw = img_size or self.img_size
        if hw is None:
            raise NsvitError("sample() needs img_size")
        hw = _check_grid("img_size", hw)
        grid = (hw[0] // self.patch_size[0], hw[1] // self.patch_size[1])
        if min(grid) < 1:
            raise NsvitError(f"img_size {hw} holds no whole {self.patch_size[0]}x{self.patch_size[1]} patch")
        coef = torch.randn(n, grid[0] * grid[1], self.dim, generator=generator, dtype=torch.float64)
        v = self.from_coefficients(coef, grid)
        if norm is not None:
            v = v * (float(norm) / v.flatten(1).norm(dim=1)).reshape(-1, 1, 1, 1)
        return v.to(dtype)

    def _check_images(self, x: torch.Tensor) -> None:
        # an integer tensor would get the basis cast to integers: all-zero projections, no error
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans \
                or x.dtype not in FLOAT_DTYPES:
            got = f"{str(x.dtype).replace('torch.', '')} {tuple(x.shape)}" if isinstance(x, torch.Tensor) \
                else type(x).__name__
            raise NsvitError(f"expected float images (B, {self.in_chans}, H, W), got {got}")


def nullspace_basis(model, rtol: float | None = None) -> PatchNullspace:
    """The exact patch-embedding nullspace of a model (adapter or timm ViT), in pixel space.

    Args:
        model: an Adapter or a supported timm ViT (wrapped with :func:`nsvit_fast.adapt`).
        rtol: rank tolerance relative to the largest singular value; default
            :func:`default_rtol` (max(D, n) * float32 eps).

    Returns:
        a :class:`PatchNullspace` from the float64 SVD of the whole (D, C*r*r) projection
        (normalisation folded in), on the CPU.

    Raises:
        NsvitError: the weight holds NaN or inf, rtol not a number in [0, 1), or the model is not a
            supported ViT.
    """
    parts = adapt(model)
    w, _ = parts.patch_projection()
    d = w.shape[0]
    mat = w.detach().reshape(d, -1).to("cpu", torch.float64)
    n = mat.shape[1]
    if not torch.isfinite(mat).all():
        raise NsvitError(f"{parts.name}: the patch projection weight holds NaN or inf")
    _, s, vh = torch.linalg.svd(mat, full_matrices=True)
    # rtol >= 1 puts every direction under the tolerance: the whole patch space would be "null"
    rtol = default_rtol((d, n)) if rtol is None else check_number("rtol", rtol, 0, 1, hi_open=True)
    rank = int((s > s.max() * rtol).sum()) if s.numel() else 0
    return PatchNullspace(basis=vh[rank:].contiguous(), row_basis=vh[:rank].contiguous(), singular_values=s,
                          rtol=rtol, in_chans=parts.in_chans, patch_size=parts.patch_size, embed_dim=d,
                          img_size=parts.img_size)


def _check_grid(name: str, hw) -> tuple[int, int]:
    """A (height, width) pair of whole numbers >= 1."""
    if not isinstance(hw, (tuple, list)) or len(hw) != 2:
        raise NsvitError(f"{name} must be a pair (H, W), got {hw!r}")
    return check_count(f"{name}[0]", hw[0]), check_count(f"{name}[1]", hw[1])


def verify_invariance(model, images: torch.Tensor, noise: torch.Tensor) -> dict:
    """How much adding ``noise`` (pixel space, same shape as images) changes the model.

    Args:
        model: an Adapter or a supported timm ViT (run as it is: call ``.eval()`` first for dropout).
        images: (B, C, H, W) pixels in [0, 1].
        noise: pixel-space noise of the images' shape (e.g. :meth:`PatchNullspace.sample`).

    Returns:
        ``{"patch_embed_rel", "logits_rel"}``: max |change| / max |clean value| of the patch tokens
        and of the logits; ``"predictions_match"``: the fraction of unchanged argmax predictions;
        ``"noise_to_image_norm"``: the smallest per-image ratio of noise norm to image norm.

    Raises:
        NsvitError: images that are not float pixels in [0, 1] (or none), noise that is not a finite
            float tensor, or noise and images that differ in shape.
    """
    parts = adapt(model)
    check_pixels("images", images)
    if not isinstance(noise, torch.Tensor) or noise.dtype not in FLOAT_DTYPES:
        raise NsvitError(f"noise must be a float tensor, got {getattr(noise, 'dtype', type(noise).__name__)}")
    check_finite("noise", noise)
    if noise.shape != images.shape:
        raise NsvitError(f"noise {tuple(noise.shape)} must have the images' shape {tuple(images.shape)}")
    with torch.no_grad():
        u, un = parts.patch_embed(images), parts.patch_embed(images + noise)
        z, zn = parts.encode(u), parts.encode(un)
    ratio = noise.flatten(1).norm(dim=1) / images.flatten(1).norm(dim=1).clamp_min(1e-12)
    return {
        "patch_embed_rel": float((un - u).abs().max() / u.abs().max().clamp_min(1e-30)),
        "logits_rel": float((zn - z).abs().max() / z.abs().max().clamp_min(1e-30)),
        "predictions_match": float((zn.argmax(-1) == z.argmax(-1)).float().mean()),
        "noise_to_image_norm": float(ratio.min()),
    }


TABLE1 = [  # the paper's Table 1: (timm name, paper's nullspace dimension)
    ("vit_tiny_patch16_224", 576), ("vit_small_patch32_224", 2688), ("vit_small_patch16_224", 384),
    ("vit_base_patch32_224", 2304), ("vit_base_patch16_224", 2), ("vit_base_patch8_224", 0),
    ("vit_large_patch32_224", 2048), ("vit_large_patch16_224", 0),
]


def nullspace_table(names: Iterable[str], rtol: float | None = None, seed: int = 0, **kwargs) -> list[dict]:
    """One summary row per timm model name, randomly initialised with ``seed`` (reproducible).

    Where C*r*r == D (ViT-B/16: 768 = 768) the map is square and its nullspace is purely
    numerical: random init gives 0 or 1 singular values under the tolerance depending on the draw;
    the paper's 2 probably came from pretrained weights (a guess: no hub weights here to check).

    Returns a list of :meth:`PatchNullspace.summary` rows; ``kwargs`` go to :func:`load_model`
    (e.g. ``pretrained=True``). Raises NsvitError as :func:`load_model` does for an unknown name."""
    rows = []
    for name in [names] if isinstance(names, str) else names:
        torch.manual_seed(seed)
        ns = nullspace_basis(load_model(name, **kwargs), rtol=rtol)
        rows.append(ns.summary(name))
    return rows
