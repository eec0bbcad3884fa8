"""The paper's Table 4 control: Gaussian noise at the insertion point, same loss as ns.

The paper says "randomly generated ϵ-noise" without saying how it is made ε, so two readings:

- ``random.match: norm`` (default): the Gaussian's norm is ``random.norm`` if set; else
  ``random.norms[round]`` (a list of per-round norms, e.g. an ns run's log; the last one repeats);
  else the norm of the round's NS noise, learned on the model as ns would. A Gaussian of that norm
  moves the output probabilities far more than ε (Fig. 3's permuted noise): a norm-matched control.
- ``random.match: eps``: the Gaussian is scaled until it moves the model's output probabilities by
  just under ε (MSE-prob in [0.9 ε, ε), ``synth.eps``) on the images the round's synthesis would
  measure on, in forward passes only: an ε-matched control, much smaller in norm than the NS noise.
  No NS noise is learned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method
from .ns import NS

MATCHES = ("norm", "eps")


@dataclass
class RandomConfig:
    """``match``: norm | eps (see the module docstring). ``norm``: a fixed noise norm; ``norms``:
    per-round norms to match. Both None under match norm: the round's NS noise's norm."""

    match: str = "norm"
    norm: float | None = None
    norms: list[float] | None = None

    def check(self) -> None:
        """Raises NsvitError for an unknown match, a norm <= 0, an empty or non-positive list of
        norms, or a norm given with match eps (which sets the scale itself)."""
        from ...errors import NsvitError

        if self.match not in MATCHES:
            raise NsvitError(f"random.match must be one of {', '.join(MATCHES)}, got {self.match!r}")
        if self.norm is not None and not float(self.norm) > 0:
            raise NsvitError(f"random.norm must be > 0 (or null: match the NS noise), got {self.norm}")
        if self.norms is not None and (not self.norms or not all(float(n) > 0 for n in self.norms)):
            raise NsvitError(f"random.norms must be a non-empty list of norms > 0 (or null), got {self.norms}")
        if self.match == "eps" and (self.norm is not None or self.norms is not None):
            raise NsvitError("random.match eps scales the noise to synth.eps itself: leave random.norm and "
                             "random.norms null")


class RandomNoise(Method):
    """NS's loss with a Gaussian token-space noise instead of the learned one (the ablation):
    per round a seeded Gaussian (N, D), scaled to ``random.norm``, else to ``random.norms[round]``
    (the last entry past its end), else to the norm of the round's learned NS noise; or, with
    ``random.match: eps``, to just inside ε on the current model."""

    name = "random"
    Config = RandomConfig
    moved_keys = {"random_norm": "norm"}
    needs_noise = True

    def learns_noise(self) -> bool:
        """Only the default, norm-matched to the round's NS noise, learns one."""
        c = self.config
        return c.match == "norm" and not c.norm and not c.norms

    def prepare(self, ctx):
        c = self.config
        g = torch.Generator().manual_seed(ctx.seed)
        v = torch.randn(ctx.parts.token_shape, generator=g)
        if c.match == "eps":
            s, mse = ctx.eps_scale(v)
            ctx.record(noise_norm=float(v.norm()) * s, mse_prob=mse)
            return v * s
        if c.norm:
            norm = float(c.norm)
        elif c.norms:
            norm = float(c.norms[min(ctx.round, len(c.norms) - 1)])
            ctx.record(noise_norm=norm)
        else:
            norm = float(ctx.ns_noise().norm())
        return v * (norm / v.norm())

    loss = NS.loss
