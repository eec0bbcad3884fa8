"""The adapter boundary: one ViT split at the noise insertion point.

Everything outside ``nsvit_fast.models`` sees a model only through this interface:

    x (B, C, H, W) pixels in [0, 1]
      --patch_embed-->  u (B, N, D)      patch tokens: the insertion point of the noise
      --encode------->  logits (B, K)    prefix tokens, positional embedding, blocks, norm, pool, head

Normalisation (mean, std from the model's own timm data config) happens inside ``patch_embed``,
so attacks, corruptions and nullspace noise all work in pixel space.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import NsvitError


class Adapter(nn.Module):
    """Base class of a model family's adapter. Subclasses fill in the geometry and the two halves."""

    family: str = "?"

    def __init__(self, model: nn.Module, mean, std, name: str = ""):
        super().__init__()
        self.model = model
        self.name = name or type(model).__name__
        self.arch = self.name  # timm architecture; load_model sets it with the constructor kwargs
        self.model_kwargs: dict[str, Any] = {}
        c = self.in_chans
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.numel() not in (1, c) or std.numel() not in (1, c):
            raise NsvitError(f"mean/std need 1 or {c} values, got {mean.numel()} and {std.numel()}")
        if bool((std <= 0).any()):
            raise NsvitError(f"std must be > 0, got {std.tolist()}")
        self.register_buffer("mean", mean.expand(c).reshape(1, c, 1, 1).clone(), persistent=False)
        self.register_buffer("std", std.expand(c).reshape(1, c, 1, 1).clone(), persistent=False)

    # -- geometry (subclasses set these attributes) --
    in_chans: int
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    embed_dim: int
    num_classes: int
    num_prefix_tokens: int

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def token_shape(self) -> tuple[int, int]:
        """Shape (N, D) of one image's patch tokens, hence of one noise."""
        return (self.num_patches, self.embed_dim)

    @property
    def data_config(self) -> dict[str, Any]:
        return {"input_size": (self.in_chans, *self.img_size),
                "mean": tuple(self.mean.flatten().tolist()), "std": tuple(self.std.flatten().tolist())}

    # -- the two halves --
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def check_images(self, x: torch.Tensor) -> None:
        """Shape check only (no host sync): (B, C, H, W) at the model's input size."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_chans, *self.img_size):
            raise NsvitError(f"{self.name} takes images (B, {self.in_chans}, {self.img_size[0]}, "
                             f"{self.img_size[1]}), got {tuple(x.shape)}")

    def patch_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, C, H, W) in [0, 1] -> patch tokens u (B, N, D)."""
        raise NotImplementedError

    def encode(self, u: torch.Tensor) -> torch.Tensor:
        """Patch tokens u (B, N, D), noise already added -> logits (B, K)."""
        raise NotImplementedError

    def encode_noisy(self, u: torch.Tensor, v: torch.Tensor | None, include_clean: bool = False,
                     backend: str | None = None) -> torch.Tensor:
        """Logits of u (B, N, D) plus every noise of v (M, N, D), broadcast over the batch:
        (M * B, K) noise-major, preceded by the B clean rows if ``include_clean``. A family may fuse
        this (the ViT adapter does); this default builds the rows and encodes them."""
        rows = [u] if include_clean else []
        if v is not None and v.shape[0]:
            rows.append((u[None] + v[:, None]).reshape(-1, *u.shape[1:]))
        return self.encode(torch.cat(rows) if len(rows) > 1 else rows[0])

    def patch_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The linear patch map in pixel space: weight (D, C, r, r) with 1/std folded in, bias (D,)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(self.patch_embed(x))

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, family={self.family!r}, img_size={self.img_size}, "
                f"patch_size={self.patch_size}, tokens={self.token_shape}, classes={self.num_classes}")
