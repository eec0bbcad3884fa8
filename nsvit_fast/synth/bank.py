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


@dataclass
class NoiseBank:
    """M noises at the adapter's insertion point, added to patch tokens u (B, N, D) as u + v_m.

    Attributes:
        noises: (M, N, D) float32.
        norm: (M,) L2 norm of each noise.
        mse_prob: (M,) held-out mean squared-L2 probability change (the ε test on held-out data).
        match_rate: (M,) held-out fraction of unchanged predictions.
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

    def __len__(self) -> int:
        return self.noises.shape[0]

    def __getitem__(self, i) -> "NoiseBank":
        import operator

        try:  # any integer (numpy's too) picks one noise and keeps the (M, N, D) shape
            i = [operator.index(i)]
        except TypeError:
            pass  # a slice, list or mask: used as given
        return NoiseBank(self.noises[i], *(getattr(self, k)[i] for k in PER_NOISE), meta=dict(self.meta))

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
        float32). Returns the path written."""
        tensors = {"noises": self.noises.float(), **{k: getattr(self, k) for k in PER_NOISE}}
        tensors["converged"] = tensors["converged"].to(torch.uint8)
        return save_tensors(path, tensors, {"kind": "nsvit-fast/noise-bank", **self.meta})

    @classmethod
    def load(cls, path: str | Path, parts=None) -> "NoiseBank":
        """Read a bank written by :meth:`save`; with ``parts``, also :meth:`check_model` it.

        Raises:
            NsvitError: the file is missing or not a noise bank, lacks a per-noise tensor, its
                tensors disagree in shape, its noises are not float32 or hold NaN / inf, a noise's
                norm is not the one recorded, its eps is not in (0, 2), or (with parts) the noise
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
        eps = meta.get("eps")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 2:
            raise NsvitError(f"{path}: metadata eps must be a number in (0, 2), got {eps!r} (edited or corrupt file)")
        bank = cls(t["noises"], *(t[k] for k in PER_NOISE), meta=meta)
        bank.converged = bank.converged.bool()
        if parts is not None:
            bank.check_model(parts, source=str(path))
        return bank

    def check_model(self, parts, source: str = "noise bank") -> None:
        """Raise if the noise shape does not fit the model; warn if it was learned on other weights."""
        from ..models import weights_fingerprint

        if self.token_shape != tuple(parts.token_shape):
            raise NsvitError(f"{source}: noises of shape {self.token_shape} do not fit {parts.name}'s "
                             f"tokens {tuple(parts.token_shape)}")
        fp = self.meta.get("model_fingerprint")
        if fp and fp != weights_fingerprint(parts):
            warnings.warn(f"{source} was learned on other weights (model {self.meta.get('model', '?')}, "
                          f"fingerprint {fp}); its ε guarantee does not carry over to this model",
                          stacklevel=2)
