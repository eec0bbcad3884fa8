"""Madry et al.'s PGD adversarial training in pixel space [0, 1] (the paper's Table 3 baseline).

torchattacks.PGD (L-inf, random start) makes x_adv; the step is CE on x_adv only. eps, step size
and steps come from the config (pgd_eps, pgd_alpha, pgd_steps; defaults 2/255, 0.5/255, 5).
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import Method, load_torchattacks


class PGD(Method):
    name = "pgd"

    def prepare(self, ctx):
        ta = load_torchattacks()
        self.attack = ta.PGD(ctx.parts, eps=ctx.cfg.pgd_eps, alpha=ctx.cfg.pgd_alpha, steps=ctx.cfg.pgd_steps,
                             random_start=True)
        return None

    def loss(self, parts, x, y, noise):
        x_adv = self.attack(x, y)
        ce = F.cross_entropy(parts(x_adv), y)
        return ce, {"ce_adv": ce.detach()}
