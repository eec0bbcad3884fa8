"""Nullspace analysis and applications: the paper's Fig. 3 / 4 / 5 studies, watermarking and
targeted nullspace noise (App. E, F) with saliency maps, and model fingerprints."""

from .edit import nullspace_edit, targeted, watermark
from .fingerprint import Fingerprint, make_fingerprint, verify
from .saliency import saliency

__all__ = ["nullspace_edit", "targeted", "watermark", "Fingerprint", "make_fingerprint", "verify", "saliency"]
