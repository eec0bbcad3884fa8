"""Madry et al.'s PGD adversarial training in pixel space [0, 1] (the paper's Table 3 baseline).

torchattacks.PGD (L-inf, random start) makes x_adv; the step is CE on x_adv only. eps, step size
and steps are ``pgd.eps``, ``pgd.alpha``, ``pgd.steps`` (defaults 2/255, 0.5/255, 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import Method, check_attack_config, load_torchattacks, own_draws_per_rank


@dataclass
class PGDConfig:
    """L-inf PGD in pixels [0, 1]: radius ``eps``, step size ``alpha``, ``steps`` steps."""

    eps: float = 2 / 255
    alpha: float = 0.5 / 255
    steps: int = 5

    def check(self) -> None:
        """Raises NsvitError for a negative radius, a step size <= 0 or fewer than 1 step."""
        check_attack_config("pgd", self.eps, self.alpha, self.steps)


class PGD(Method):
    """Madry PGD adversarial training: ``prepare`` builds torchattacks.PGD on the round's model,
    ``loss`` is CE on its x_adv only (``ce_adv`` in the log)."""

    name = "pgd"
    Config = PGDConfig
    moved_keys = {"pgd_eps": "eps", "pgd_alpha": "alpha", "pgd_steps": "steps"}
    rebuild_on_resume = True

    def prepare(self, ctx):
        ta = load_torchattacks()
        c = self.config
        self.attack = ta.PGD(ctx.parts, eps=c.eps, alpha=c.alpha, steps=c.steps, random_start=True)
        return None

    def loss(self, parts, x, y, noise):
        x_adv = own_draws_per_rank(self.attack, x, y)  # each rank its own random start
        ce = F.cross_entropy(parts(x_adv), y)
        return ce, {"ce_adv": ce.detach()}
