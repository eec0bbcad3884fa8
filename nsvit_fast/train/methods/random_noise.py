"""The paper's Table 4 control: Gaussian noise at the insertion point, same loss as ns.

The paper calls it "randomly generated ϵ-noise" and "an ϵ noise sampled from a Gaussian
distribution" (§5.5; the official code has none), without saying how it is made ε. Two readings:

- ``random.match: eps`` (default, the literal one): the round's Gaussian is scaled until it moves
  the model's output probabilities by just under ε (MSE-prob in [0.9 ε, ε), ``synth.eps``) on the
  images the round's synthesis would measure on, in forward passes only: an ε-noise, as the learned
  one is, but random. No NS noise is learned.
- ``random.match: norm``: the Gaussian's norm is ``random.norm`` if set; else ``random.norms[round]``
  (a list of per-round norms, e.g. an ns run's log; the last one repeats); else the norm of the
  round's NS noise, learned on the model as ns would. A Gaussian of that norm moves the output
  probabilities far more than ε (Fig. 3's permuted noise): a norm-matched control, not an ε-noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method
from .ns import NS

MATCHES = ("eps", "norm")


@dataclass
class RandomConfig:
    """``match``: eps | norm (see the module docstring). ``norm``: a fixed noise norm; ``norms``:
    per-round norms to match; both with match norm only (both None: the round's NS noise's norm)."""

    match: str = "eps"
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
            raise NsvitError("random.norm and random.norms set a norm-matched control: add random.match=norm "
                             "(random.match eps, the default, scales the noise to synth.eps itself)")


class RandomNoise(Method):
    """NS's loss with a seeded Gaussian token-space noise (N, D) instead of the learned one (the
    ablation): scaled to just inside ε on the current model (``random.match: eps``, default), or
    with ``random.match: norm`` to ``random.norm``, else ``random.norms[round]`` (the last entry past
    its end), else the norm of the round's learned NS noise."""

    name = "random"
    Config = RandomConfig
    moved_keys = {"random_norm": "norm"}
    absent_means = {"match": "norm"}  # the control before random.match existed
    needs_noise = True

    def learns_noise(self) -> bool:
        """Only the norm-matched control without given norms learns the round's NS noise."""
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
