"""Nullspace analysis and applications: the paper's Fig. 3 / 4 / 5 studies, watermarking and
targeted nullspace noise (App. E, F) with saliency maps, and model fingerprints.

Computations (``watermark``, ``targeted``, ``make_fingerprint``, ``verify``, ``saliency``) return
tensors and numbers; ``studies.fig3`` / ``fig5`` / ``trend`` and the ``run_*`` functions also write
their figures and JSON, and are what the ``analyze``, ``watermark``, ``targeted`` and ``fingerprint``
commands call."""

from . import studies
from .apps import run_fingerprint_make, run_fingerprint_verify, run_targeted, run_watermark
from .edit import nullspace_edit, targeted, watermark
from .fingerprint import Fingerprint, make_fingerprint, verify
from .saliency import saliency

__all__ = ["nullspace_edit", "targeted", "watermark", "Fingerprint", "make_fingerprint", "verify", "saliency",
           "studies", "run_watermark", "run_targeted", "run_fingerprint_make", "run_fingerprint_verify"]
