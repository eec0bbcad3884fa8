"""TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv from torchattacks.TPGD
(the KL-maximising PGD TRADES uses), in pixel space [0, 1]. Defaults: beta 6, eps 2/255, 5 steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, load_torchattacks


class TRADES(Method):
    name = "trades"

    def prepare(self, ctx):
        ta = load_torchattacks()
        self.attack = ta.TPGD(ctx.parts, eps=ctx.cfg.pgd_eps, alpha=ctx.cfg.pgd_alpha, steps=ctx.cfg.pgd_steps)
        self.beta = ctx.cfg.trades_beta
        return None

    def loss(self, parts, x, y, noise):
        x_adv = self.attack(x, y)
        z = parts(torch.cat([x, x_adv]))
        zc, za = z[: x.shape[0]], z[x.shape[0]:]
        ce = F.cross_entropy(zc, y)
        kl = F.kl_div(F.log_softmax(za, -1), F.softmax(zc, -1), reduction="batchmean")
        return ce + self.beta * kl, {"ce_clean": ce.detach(), "kl_adv": kl.detach()}
