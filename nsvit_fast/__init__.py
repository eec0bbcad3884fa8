"""nsvit-fast: robust Vision Transformers by approximate nullspace augmented finetuning.

Liu, Singh, Li, Wang (CPAL 2025). Public API::

    import nsvit_fast as ns
    parts = ns.load_model("digits_vit")            # or any timm ViT name, with checkpoint=...
    basis = ns.nullspace_basis(parts)               # exact patch-embedding nullspace
    noise = basis.sample(8, norm=100.0)             # pixel-space noise the model cannot see
    ns.verify_invariance(parts, images, noise)

"The official code" in the docstrings is the paper's public implementation,
https://github.com/Liu-Hy/NS-ViT; the ``reference`` synthesis mode follows it step for step.
"""

__version__ = "0.1.0"

from .errors import NsvitError  # noqa: E402
from .models import Adapter, adapt, load_model, save_model, weights_fingerprint  # noqa: E402
from .nullspace import PatchNullspace, nullspace_basis, nullspace_table, verify_invariance  # noqa: E402
from .data import ImageDataset, digits, image_folder, load_data, synthetic  # noqa: E402

__all__ = [
    "__version__", "NsvitError", "Adapter", "adapt", "load_model", "save_model", "weights_fingerprint",
    "PatchNullspace", "nullspace_basis", "nullspace_table", "verify_invariance",
    "ImageDataset", "digits", "image_folder", "load_data", "synthetic",
]
