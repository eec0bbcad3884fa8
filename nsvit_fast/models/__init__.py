"""Model adapters: any supported timm ViT -> patch_embed / encode, pixels in [0, 1] in, logits out."""

from .base import Adapter
from .loading import load_model, read_weights, save_model, weights_fingerprint
from .registry import FAMILIES, adapt, family_of
from .vit import VitAdapter

__all__ = ["Adapter", "VitAdapter", "FAMILIES", "adapt", "family_of", "load_model", "read_weights",
           "save_model", "weights_fingerprint"]
