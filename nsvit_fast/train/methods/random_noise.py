"""The paper's Table 4 control: Gaussian noise at the insertion point, same loss as ns.

Its norm is, in this order: ``random.norm`` if set; else ``random.norms[round]`` (a list of
per-round norms, e.g. an ns run's log; the last one repeats); else the norm of the round's NS noise,
learned on the model as ns would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method
from .ns import NS


@dataclass
class RandomConfig:
    """``norm``: a fixed noise norm; ``norms``: per-round norms to match. Both None: learn the NS noise."""

    norm: float | None = None
    norms: list[float] | None = None

    def check(self) -> None:
        """Raises NsvitError for a norm <= 0 or an empty or non-positive list of norms."""
        from ...errors import NsvitError

        if self.norm is not None and not float(self.norm) > 0:
            raise NsvitError(f"random.norm must be > 0 (or null: match the NS noise), got {self.norm}")
        if self.norms is not None and (not self.norms or not all(float(n) > 0 for n in self.norms)):
            raise NsvitError(f"random.norms must be a non-empty list of norms > 0 (or null), got {self.norms}")


class RandomNoise(Method):
    """NS's loss with a Gaussian token-space noise instead of the learned one (the ablation):
    per round a seeded Gaussian (N, D) scaled to ``random.norm``, else to ``random.norms[round]``
    (the last entry past its end), else to the norm of the round's learned NS noise."""

    name = "random"
    Config = RandomConfig
    moved_keys = {"random_norm": "norm"}
    needs_noise = True

    def prepare(self, ctx):
        c = self.config
        if c.norm:
            norm = float(c.norm)
        elif c.norms:
            norm = float(c.norms[min(ctx.round, len(c.norms) - 1)])
            ctx.record(noise_norm=norm)
        else:
            norm = float(ctx.ns_noise().norm())
        g = torch.Generator().manual_seed(ctx.seed)
        v = torch.randn(ctx.parts.token_shape, generator=g)
        return v * (norm / v.norm())

    loss = NS.loss
