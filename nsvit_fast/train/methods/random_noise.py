"""The paper's Table 4 control: Gaussian noise at the insertion point, same loss as ns.

Its norm is the norm the round's NS noise has (``ctx.ns_norm()``: from a given list of norms, e.g.
an NS run's log, or by learning that noise), or a fixed ``random_norm`` from the config.
"""

from __future__ import annotations

import torch

from .base import Method
from .ns import NS


class RandomNoise(Method):
    name = "random"

    def prepare(self, ctx):
        norm = ctx.cfg.random_norm or ctx.ns_norm()
        g = torch.Generator().manual_seed(ctx.round_seed)
        v = torch.randn(ctx.parts.token_shape, generator=g)
        return v * (norm / v.norm())

    loss = NS.loss
