"""NoiseBank: learned ε-approximate nullspace noises with what is known about each."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import NsvitError, check_finite
from ..io import load_tensors, save_tensors

PER_NOISE = ("norm", "mse_prob", "match_rate", "steps", "converged", "batch_mse_prob")
MIN_NORM = 1e-12  # below it a noise is zero in float32 next to any patch token


@dataclass
class NoiseBank:
    """M noises at the adapter's insertion point, added to patch tokens u (B, N, D) as u + v_m.

    Attributes:
        noises: (M, N, D) float32.
        norm: (M,) L2 norm of each noise.
        mse_prob: (M,) mean squared-L2 probability change on the metric images (the ε test):
            held-out, given, or a sample of the training images under ``stop="batch"``
            (``meta["heldout_source"]``; ``meta["heldout_images"]`` of them).
        match_rate: (M,) fraction of unchanged predictions on the same images.
        steps: (M,) optimiser updates taken before the stop (max_steps if it never stopped).
        converged: (M,) whether the stop rule fired.
        batch_mse_prob: (M,) MSE-prob on the batch where the stop rule fired (or the last batch).
        meta: eps, lim, lr, schedule, mode, stop rule, model name and weights fingerprint, seconds...
    """

    noises: torch.Tensor
    norm: torch.Tensor
    mse_prob: torch.Tensor
    match_rate: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor
    batch_mse_prob: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="noise bank", repr=False, compare=False)  # what errors name: the file read

    def __len__(self) -> int:
        return self.noises.shape[0]

    def __getitem__(self, i) -> "NoiseBank":
        import operator

        try:  # any integer (numpy's too) picks one noise and keeps the (M, N, D) shape
            i = [operator.index(i)]
        except TypeError:
            pass  # a slice, list or mask: used as given
        else:  # an IndexError still (it ends a for loop over the bank), but one that says why
            if not -len(self) <= i[0] < len(self):
                raise IndexError(f"noise {i[0]} out of range: the bank has {len(self)} noise(s)")
        return NoiseBank(self.noises[i], *(getattr(self, k)[i] for k in PER_NOISE), meta=dict(self.meta),
                         source=self.source)

    @property
    def token_shape(self) -> tuple[int, int]:
        """(N, D), the shape of one noise (the model's patch tokens)."""
        return tuple(self.noises.shape[1:])

    def summary(self) -> dict[str, Any]:
        """JSON-ready per-noise lists (norm, mse_prob, match_rate rounded to 6 digits; steps;
        converged) with ``num_noises`` and every ``meta`` entry."""
        f = lambda t: [round(float(x), 6) for x in t]  # noqa: E731
        return {"norm": f(self.norm), "mse_prob": f(self.mse_prob),
                "match_rate": f(self.match_rate), "steps": [int(s) for s in self.steps],
                "converged": [bool(c) for c in self.converged], **{k: v for k, v in self.meta.items()},
                "num_noises": len(self)}  # after meta: a bank indexed out of a larger one keeps its meta

    def save(self, path: str | Path) -> Path:
        """Write the bank to a safetensors file (atomically; ``meta`` in its header, noises as
        float32). Returns the path written. Raises NsvitError for a name not ending in
        ``.safetensors`` (``bank.pt`` held safetensors, which ``torch.load`` cannot read) or a zero
        noise (:meth:`load` refuses one), before anything is written."""
        if Path(path).suffix.lower() != ".safetensors":  # as the CLI checks it: X.SAFETENSORS failed after the run
            raise NsvitError(f"{path}: a NoiseBank is written as safetensors; give a .safetensors name")
        norm = self.noises.double().flatten(1).norm(dim=1)
        if bool((norm < MIN_NORM).any()):  # load refuses it: do not write a file that cannot be read back
            i = int((norm < MIN_NORM).nonzero()[0])
            raise NsvitError(f"noise {i} has norm {float(norm[i]):.4g}, below {MIN_NORM:g}: it moves nothing, so "
                             f"the bank would test nothing (a lim too small?); nothing was written")
        tensors = {"noises": self.noises.float(), **{k: getattr(self, k) for k in PER_NOISE}}
        tensors["converged"] = tensors["converged"].to(torch.uint8)
        return save_tensors(path, tensors, {"kind": "nsvit-fast/noise-bank", **self.meta})

    @classmethod
    def load(cls, path: str | Path, parts=None) -> "NoiseBank":
        """Read a bank written by :meth:`save`; with ``parts``, also :meth:`check_model` it.

        Raises:
            NsvitError: the file is missing or not a noise bank, lacks a per-noise tensor, its
                tensors disagree in shape, its noises are not float32 or hold NaN / inf, a noise's
                norm is not the one recorded or is zero, its eps is not in (0, 2), its model,
                model fingerprint or token shape is not recorded (or the shape is not the noises'),
                a per-noise record is out of range (converged not 0/1, steps < 0 or fractional,
                MSE-probs outside [0, 2], match rates outside [0, 1]), or (with parts) the noise
                shape does not fit the model. Warns when the bank was learned on other weights.
        """
        t, meta = load_tensors(path)
        if meta.get("kind") != "nsvit-fast/noise-bank" or "noises" not in t:
            raise NsvitError(f"{path} is not a noise bank saved by nsvit-fast")
        missing = [k for k in PER_NOISE if k not in t]
        if missing:
            raise NsvitError(f"{path}: noise bank lacks tensor {missing[0]!r} (edited or corrupt file)")
        m = t["noises"].shape[0] if t["noises"].dim() == 3 else -1
        if m < 1 or any(t[k].shape != (m,) for k in PER_NOISE):
            raise NsvitError(f"{path}: noise bank tensors disagree in shape (noises {tuple(t['noises'].shape)}; "
                             f"expected (M, N, D) and (M,) per noise)")
        if t["noises"].dtype != torch.float32:  # what save writes; an int or bool bank would be scored as noise
            raise NsvitError(f"{path}: noises are {str(t['noises'].dtype).replace('torch.', '')}, not float32 "
                             f"(edited or corrupt file)")
        check_finite(f"{path}: noises", t["noises"])  # a NaN noise would poison every batch it touches
        for k in PER_NOISE:
            if k != "converged":
                check_finite(f"{path}: {k}", t[k])
        norm = t["noises"].double().flatten(1).norm(dim=1)
        off = ~((norm - t["norm"].double()).abs() <= 1e-3 * norm + 1e-6)
        if bool(off.any()):  # the header's record of each noise against the noise itself
            i = int(off.nonzero()[0])
            raise NsvitError(f"{path}: noise {i} has norm {float(norm[i]):.4g}, but the bank records "
                             f"{float(t['norm'][i]):.4g} (edited or corrupt file)")
        if bool((norm < MIN_NORM).any()):  # a zeroed noise moves nothing: every check on it would pass
            i = int((norm < MIN_NORM).nonzero()[0])
            raise NsvitError(f"{path}: noise {i} has norm {float(norm[i]):.4g}, below {MIN_NORM:g}: a zero noise "
                             f"tests nothing (edited or corrupt file)")
        for k in ("model", "model_fingerprint"):  # synth writes them; without them no other-weights warning
            if not isinstance(meta.get(k), str) or not meta.get(k):
                raise NsvitError(f"{path}: metadata {k!r} must name the model the noises were learned on, got "
                                 f"{meta.get(k)!r} (edited or corrupt file)")
        shape = list(t["noises"].shape[1:])
        if meta.get("token_shape", shape) != shape:
            raise NsvitError(f"{path}: metadata token_shape {meta.get('token_shape')!r} is not the noises' "
                             f"{shape} (edited or corrupt file)")
        c = t["converged"]
        if c.dtype != torch.uint8 or bool((c > 1).any()):  # as save writes it; 0.5 would read as True
            raise NsvitError(f"{path}: converged must be 0/1 (uint8) per noise (edited or corrupt file)")
        st = t["steps"]
        if st.is_floating_point() or st.dtype == torch.bool or bool((st < 0).any()):
            raise NsvitError(f"{path}: steps must be whole counts >= 0 (edited or corrupt file)")
        for k, hi in (("mse_prob", 2.0), ("batch_mse_prob", 2.0), ("match_rate", 1.0)):
            # an MSE of two probability vectors lies in [0, 2]; a match rate in [0, 1]
            if bool(((t[k] < 0) | (t[k] > hi)).any()):
                raise NsvitError(f"{path}: {k} must lie in [0, {hi:g}] (edited or corrupt file)")
        eps = meta.get("eps")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 2:
            raise NsvitError(f"{path}: metadata eps must be a number in (0, 2), got {eps!r} (edited or corrupt file)")
        bank = cls(t["noises"], *(t[k] for k in PER_NOISE), meta=meta, source=str(path))
        bank.converged = bank.converged.bool()
        if parts is not None:
            bank.check_model(parts, source=str(path))
        return bank

    def check_fits(self, parts, source: str | None = None) -> None:
        """Raise if the noise shape does not fit the model's patch tokens."""
        if self.token_shape != tuple(parts.token_shape):
            raise NsvitError(f"{source or self.source}: noises of shape {self.token_shape} do not fit {parts.name}'s "
                             f"tokens {tuple(parts.token_shape)}")

    def check_model(self, parts, source: str | None = None) -> None:
        """Raise if the noise shape does not fit the model; warn if it was learned on other weights."""
        from ..models import weights_fingerprint

        self.check_fits(parts, source)
        source = source or self.source
        fp = self.meta.get("model_fingerprint")
        if fp and fp != weights_fingerprint(parts):
            warnings.warn(f"{source} was learned on other weights (model {self.meta.get('model', '?')}, "
                          f"fingerprint {fp}); its ε guarantee does not carry over to this model",
                          stacklevel=2)
