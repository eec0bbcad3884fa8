"""Plain finetuning: cross-entropy on clean data, same steps and schedule (the control)."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Method


class Plain(Method):
    """The control: CE on the clean batch, no noise."""

    name = "plain"

    def loss(self, parts, x, y, noise):
        ce = F.cross_entropy(parts(x), y)
        return ce, {"ce_clean": ce.detach()}
