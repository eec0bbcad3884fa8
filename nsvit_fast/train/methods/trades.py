"""TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv from torchattacks.TPGD
(the KL-maximising PGD TRADES uses), in pixel space [0, 1]. ``trades.beta``, ``trades.eps``,
``trades.alpha``, ``trades.steps``; defaults beta 6, eps 2/255, step 0.5/255, 5 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Method, check_attack_config, load_torchattacks, own_draws_per_rank


@dataclass
class TRADESConfig:
    """The KL weight ``beta`` and TPGD's L-inf radius ``eps``, step size ``alpha`` and ``steps`` (pixels)."""

    beta: float = 6.0
    eps: float = 2 / 255
    alpha: float = 0.5 / 255
    steps: int = 5

    def check(self) -> None:
        """Raises NsvitError for beta < 0 or an attack setting that cannot be meant."""
        from ...errors import NsvitError

        if not self.beta >= 0:
            raise NsvitError(f"trades.beta must be >= 0, got {self.beta}")
        check_attack_config("trades", self.eps, self.alpha, self.steps)


class TRADES(Method):
    """TRADES: ``prepare`` builds torchattacks.TPGD on the round's model; ``loss`` is
    CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv)), batch mean, clean and adversarial
    images in one forward."""

    name = "trades"
    Config = TRADESConfig
    moved_keys = {"trades_beta": "beta", "pgd_eps": "eps", "pgd_alpha": "alpha", "pgd_steps": "steps"}
    rebuild_on_resume = True

    def prepare(self, ctx):
        ta = load_torchattacks()
        c = self.config
        self.attack = ta.TPGD(ctx.parts, eps=c.eps, alpha=c.alpha, steps=c.steps)
        return None

    def loss(self, parts, x, y, noise):
        x_adv = own_draws_per_rank(self.attack, x, y)  # each rank its own random start
        z = parts(torch.cat([x, x_adv]))
        zc, za = z[: x.shape[0]], z[x.shape[0]:]
        ce = F.cross_entropy(zc, y)
        kl = F.kl_div(F.log_softmax(za, -1), F.softmax(zc, -1), reduction="batchmean")
        return ce + self.config.beta * kl, {"ce_clean": ce.detach(), "kl_adv": kl.detach()}
