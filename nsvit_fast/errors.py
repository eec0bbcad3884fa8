"""The one exception type for a user's mistake.

Anything raised as :class:`NsvitError` is bad input (a wrong model family, an image of the wrong
size, eps <= 0, a missing folder, a truncated checkpoint...). The CLI prints its message as one
line and exits with code 2; other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import math

import torch


class NsvitError(ValueError):
    """Bad input from the user. The message is one line that says what and why."""


def check_positive(name: str, value: float) -> float:
    """Return ``value`` if it is a finite number > 0 (not a bool: True is no scale), else raise :class:`NsvitError`."""
    if isinstance(value, bool):
        raise NsvitError(f"{name} must be a number > 0, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise NsvitError(f"{name} must be a number > 0, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise NsvitError(f"{name} must be a finite number > 0, got {value!r}")
    return v


MAX_COUNT = 2**31 - 1  # counts (steps, rounds, images, batch sizes): int32, so no tensor or loop index overflows
MAX_WORKERS = 256  # DataLoader worker processes: each is a fork; 100000 would exhaust the process table
MAX_NOISE_SCALE = 1e6  # demo noise norm / image norm: float32 noise overflows (sum of squares) far above
MAX_FINGERPRINT_SCALE = 1e3  # fingerprint noise / image norm: float32 round-off lifts the owner's own score
# with the scale (1.8e-2 at 1e6, NaN at 1e30); at 1e3 it stays near 1e-5, far below the threshold
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes < 2**32; torch overflows at 2**64, and seeds get offsets added


def check_seed(name: str, value) -> int:
    """Return ``value`` as an int if it is a whole number in [0, MAX_SEED]."""
    v = check_count(name, value, 0, MAX_SEED)
    if v > MAX_SEED:
        raise NsvitError(f"{name} must be <= {MAX_SEED} (2**32 - 1), got {value!r}")
    return v


def check_count(name: str, value, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """Return ``value`` as an int if it is a whole number in [``minimum``, ``maximum``] (bools and 1.7
    are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if not (isinstance(value, float) and value.is_integer()):
            raise NsvitError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise NsvitError(f"{name} must be >= {minimum}, got {value!r}")
    if int(value) > maximum:
        raise NsvitError(f"{name} must be <= {maximum}, got {value!r}")
    return int(value)


def check_number(name: str, value, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """Return ``value`` as a float if it is a finite number in the given range (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NsvitError(f"{name} must be a number, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) \
        or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        rng = (f"{'(' if lo_open else '['}{'-inf' if lo is None else f'{lo:g}'}, "
               f"{'inf' if hi is None else f'{hi:g}'}{')' if hi_open or hi is None else ']'}")
        raise NsvitError(f"{name} must be a finite number in {rng}, got {value!r}")
    return v


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Raise :class:`NsvitError` if ``t`` holds NaN or inf (one host sync; call it on inputs, not in loops),
    or is a float type torch cannot compute with here (float8: not even ``isfinite`` runs on it)."""
    if t.is_floating_point() and t.dtype not in FLOAT_DTYPES:
        raise NsvitError(f"{name} is {str(t.dtype).replace('torch.', '')}; float16, bfloat16, float32 or float64 "
                         f"expected")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NsvitError(f"{name} holds {bad} NaN or inf value(s)")
    return t


def check_pixels(name: str, x: torch.Tensor, *, tol: float = 1e-6) -> torch.Tensor:
    """Images must be a non-empty (B, C, H, W) float tensor of pixels in [0, 1] with no NaN (uint8
    or 0-255 images are refused: a model would score them as something else)."""
    if not isinstance(x, torch.Tensor):
        raise NsvitError(f"{name} must be a torch tensor (B, C, H, W) of pixels in [0, 1], got {type(x).__name__}")
    if x.dim() != 4 or not x.is_floating_point():
        raise NsvitError(f"{name} must be a float tensor (B, C, H, W) of pixels in [0, 1], got "
                         f"{str(x.dtype).replace('torch.', '')} {tuple(x.shape)}")
    if x.shape[0] == 0 or x.numel() == 0:
        raise NsvitError(f"{name} is empty: {tuple(x.shape)}")
    check_finite(name, x)
    lo, hi = float(x.min()), float(x.max())
    if lo < -tol or hi > 1 + tol:
        raise NsvitError(f"{name} must be pixels in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return x


def check_labels(name: str, y, n: int | None = None, num_classes: int | None = None) -> torch.Tensor:
    """Labels must be a 1-D integer tensor (not bool, not float: 2.7 would be read as 2) of class
    indices >= 0, ``n`` of them and below ``num_classes`` when given. Returns them as int64."""
    if not isinstance(y, torch.Tensor):
        raise NsvitError(f"{name} must be a torch tensor of class indices, got {type(y).__name__}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex() or y.dim() != 1:
        raise NsvitError(f"{name} must be a 1-D integer tensor of class indices, got "
                         f"{str(y.dtype).replace('torch.', '')} {tuple(y.shape)}")
    if n is not None and y.shape[0] != n:
        raise NsvitError(f"{name}: {y.shape[0]} labels for {n} images")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            top = f" and < {num_classes} (the model's outputs)" if num_classes is not None else ""
            raise NsvitError(f"{name} must be class indices >= 0{top}, got values in [{lo}, {hi}]")
    return y.long()


__all__ = ["NsvitError", "check_positive", "check_count", "check_number", "check_finite", "check_pixels",
           "check_labels"]


def env_int(var: str, default: int) -> int:
    """The whole number in environment variable ``var`` (torchrun's WORLD_SIZE, RANK, LOCAL_RANK),
    ``default`` when unset. Raises NsvitError for anything else (int() would raise a bare ValueError)."""
    import os

    text = os.environ.get(var)
    if text is None:
        return default
    digits = text.strip().lstrip("-")
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 9:  # "²" is a digit to isdigit, not to int
        raise NsvitError(f"environment variable {var}={text!r} must be a whole number below 10**9 (torchrun sets it)")
    return int(text)
