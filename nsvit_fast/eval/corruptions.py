"""ImageNet-C style corruptions (15 types x 5 severities) and mCE.

On-the-fly corruption uses ``imagecorruptions-imaug`` (the maintained fork; the original
``imagecorruptions`` does not import with numpy 2). It needs images of at least 32 px a side:
smaller images are refused with a clear error rather than silently resized. Pre-generated
ImageNet-C folders (``<root>/<corruption>/<severity>/<class>/...``) are read as they are.

mCE (Hendrycks & Dietterich 2019): CE_c = sum_s err(c, s) / sum_s err_ref(c, s), mCE = 100 mean_c CE_c.
On ImageNet the reference is AlexNet (its published mean errors per corruption below); on other
data it is a baseline model the caller names (by default the un-finetuned model).

AlexNet's errors were measured on the original ImageNet-C files. Normalising errors on corruptions
made on the fly by ``imagecorruptions-imaug`` by them gives an approximate mCE (recorded with the
setting ``ref=alexnet(approx)``); the pre-generated ImageNet-C folders (suite ``imagenet-c``) give
the number comparable with published ones.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import NsvitError, check_count, check_pixels, check_seed

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
# AlexNet's ImageNet-C error (fraction) per corruption, averaged over the 5 severities (published)
ALEXNET_ERR = {"gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
               "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
               "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204,
               "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500}
MIN_SIZE = 32
SEEDED = ("impulse_noise", "glass_blur")  # the corruptions that take a seed= of their own


def _lib():
    try:
        import imagecorruptions
    except ImportError:
        raise NsvitError("corruptions need imagecorruptions-imaug: pip install imagecorruptions-imaug==1.1.5") from None
    return imagecorruptions


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0, start: int = 0) -> torch.Tensor:
    """Corrupt pixels (B, C, H, W) in [0, 1] with ``name`` at ``severity`` (1-5); same shape.

    Seeded per image from (seed, corruption, severity, start + its index in the batch): image i of
    a set gets the same corruption whether the set is corrupted whole or batch by batch (``start``
    being the batch's offset), so a streamed folder matches the in-memory path.

    Returns a new tensor in [0, 1]. Raises NsvitError for an unknown corruption, a severity that is
    not a whole number 1-5, images that are not float pixels in [0, 1] with 1 or 3 channels, or
    smaller than the corruptions need, a bad seed or start."""
    if name not in CORRUPTIONS:
        raise NsvitError(f"unknown corruption {name!r} (corruptions: {', '.join(CORRUPTIONS)})")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise NsvitError(f"severity must be a whole number 1-5, got {severity!r}")
    check_pixels("images", images)  # 0-255 or uint8 pixels would be clamped to white, NaN to black
    seed, start = check_seed("seed", seed), check_count("start", start, 0)
    b, c, h, w = images.shape
    if c not in (1, 3):
        raise NsvitError(f"corruptions take 1- or 3-channel images, got {c} channels")
    if min(h, w) < MIN_SIZE:
        raise NsvitError(f"corruptions need images of at least {MIN_SIZE}x{MIN_SIZE} px "
                         f"(imagecorruptions), got {h}x{w}")
    ic = _lib()
    state = np.random.get_state()  # the library draws from numpy's global RNG

    def one(i: int, a: np.ndarray) -> np.ndarray:
        key = [seed, CORRUPTIONS.index(name), severity, start + i]
        np.random.seed(key)
        # impulse_noise draws from skimage's own generator and glass_blur from numba's (seeded from the
        # OS when given none), not numpy's global one: both take a seed
        kw = {"seed": np.random.SeedSequence(key).generate_state(1)[0]} if name in SEEDED else {}
        return np.asarray(ic.corrupt(a, corruption_name=name, severity=severity, **kw))[:h, :w, :3]

    try:
        arr = (images.detach().cpu().permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        if c == 1:
            arr = np.repeat(arr, 3, axis=3)
        out = np.stack([one(i, a) for i, a in enumerate(arr)]).astype(np.float32) / 255.0
    finally:
        np.random.set_state(state)
    t = torch.from_numpy(out).permute(0, 3, 1, 2)
    return (t[:, :1] if c == 1 else t).contiguous()


class CorruptionSet:
    """Corrupted copies of one image set, made once per (corruption, severity) and reused for every
    model evaluated in the same run."""

    def __init__(self, images: torch.Tensor, seed: int = 0):
        self.images, self.seed = images, seed
        self._cache: dict[tuple[str, int], torch.Tensor] = {}

    def get(self, name: str, severity: int) -> torch.Tensor:
        """The images (B, C, H, W) under corruption ``name`` at ``severity`` (1-5), made on first
        use (seeded) and kept. Raises NsvitError as :func:`corrupt` does."""
        key = (name, severity)
        if key not in self._cache:
            self._cache[key] = corrupt(self.images, name, severity, self.seed)
        return self._cache[key]


def mce(err: dict[str, list[float]], reference: dict[str, list[float]] | dict[str, float]) -> float:
    """100 * mean_c (sum_s err[c][s] / sum_s ref[c][s]); a float reference is a per-corruption mean
    over severities (AlexNet's published numbers), so its sum is 5 x the mean.

    ``err`` maps corruption names to error fractions per severity; every name must be in
    ``reference``. Raises NsvitError for no corruptions, a corruption the reference lacks, errors
    that are not fractions in [0, 1] (percentages would give a 100x mCE), or a reference error
    that sums to 0."""
    if not isinstance(err, dict) or not err:
        raise NsvitError("mCE needs the errors of at least one corruption")
    missing = [c for c in err if c not in reference]
    if missing:
        raise NsvitError(f"the reference has no errors for {missing}")
    for c, e in err.items():
        if not isinstance(e, (list, tuple)) or not e or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in e):
            raise NsvitError(f"errors of {c} must be a list of fractions in [0, 1] (not %), got {e!r}")
    ces = []
    for c, e in err.items():
        ref = reference[c]
        ref_sum = sum(ref) if isinstance(ref, (list, tuple)) else ref * len(e)
        if ref_sum <= 0:
            raise NsvitError(f"reference error for {c} is 0: mCE is undefined")
        ces.append(sum(e) / ref_sum)
    return 100.0 * sum(ces) / len(ces)


def mce_imagenet(err: dict[str, list[float]]) -> float:
    """mCE (in %) against AlexNet's published ImageNet-C errors; ``err`` maps each of the 15
    corruptions to its error fractions at severities 1-5. Raises NsvitError for a corruption
    AlexNet has no number for, and for fewer corruptions or severities: AlexNet's numbers are
    means over all five severities, and the mCE is defined over all 15 corruptions."""
    missing = [c for c in err if c not in ALEXNET_ERR]
    if missing:
        raise NsvitError(f"no AlexNet reference for {missing}")
    value = mce(err, ALEXNET_ERR)
    short = [c for c in ALEXNET_ERR if len(err.get(c, ())) != len(SEVERITIES)]
    if short:
        raise NsvitError(f"the AlexNet mCE needs all {len(ALEXNET_ERR)} corruptions at severities 1-5; "
                         f"{len(short)} lack some or all, e.g. {short[:3]}")
    return value
