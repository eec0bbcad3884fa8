"""Model adapters: any supported timm ViT -> patch_embed / encode, pixels in [0, 1] in, logits out.

Families: ``vit`` (timm VisionTransformer: ViT, DeiT, register and attention-pool variants) and
``eva`` (timm Eva: EVA-02 and the RoPE ViTs). ``base.py`` is the whole interface the rest of the
package uses.
"""

from .base import Adapter
from .eva import EvaAdapter
from .loading import create_model, load_model, read_weights, save_model, weights_fingerprint
from .registry import FAMILIES, adapt, family_of
from .vit import VitAdapter

__all__ = ["Adapter", "VitAdapter", "EvaAdapter", "FAMILIES", "adapt", "family_of", "create_model", "load_model",
           "read_weights", "save_model", "weights_fingerprint"]
