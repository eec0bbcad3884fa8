"""A finetuning method: what noise a round needs and the loss of one model step.

The engine owns the loop, optimiser, schedule, EMA, checkpoints and logs; a method only says

    prepare(ctx) -> noise (N, D) or None     once per round (ctx.synth() learns ε-noise on the model)
    loss(parts, x, y, noise) -> (loss, {name: float tensor})    once per model step, x pixels in [0, 1]

A new method is one file in this folder and one entry in ``METHODS``.
"""

from __future__ import annotations

import torch


class Method:
    name = "?"

    def prepare(self, ctx) -> torch.Tensor | None:
        return None

    def loss(self, parts, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None):
        raise NotImplementedError


def load_torchattacks():
    try:
        import torchattacks
    except ImportError:
        from ...errors import NsvitError

        raise NsvitError("this needs torchattacks: pip install --no-deps torchattacks "
                         "(--no-deps: its requests pin would downgrade other packages)") from None
    return torchattacks
