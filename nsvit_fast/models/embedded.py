"""The embedded default model: a small ViT trained on scikit-learn's digits by ``nsvit-fast pretrain``.

img 32, patch 8 gives C*r*r = 192 input dims per patch against D = 96, so the patch embedding has
a 96-dimensional exact nullspace, as the paper's ViT-S/32 has one of 2688.
"""

from __future__ import annotations

from pathlib import Path

NAME = "digits_vit"
ARCH = "vit_tiny_patch16_224"  # timm's ViT-Ti constructor, resized by the kwargs below
KWARGS = dict(img_size=32, patch_size=8, embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0, num_classes=10)
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "digits_vit.safetensors"
REGENERATE = "nsvit-fast pretrain --out nsvit_fast/assets/digits_vit.safetensors --seed 0"
