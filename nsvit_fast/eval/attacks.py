"""Accuracy under standard attacks, in pixel space [0, 1] through torchattacks.

The official code fed torchattacks normalised tensors although torchattacks expects (and clamps
to) pixels in [0, 1]; here the adapter normalises inside the model, so attacks see pixels.
"""

from __future__ import annotations

import torch

from ..errors import NsvitError
from ..extras import load_torchattacks

ATTACKS = {  # name -> (torchattacks class, defaults)
    "fgsm": ("FGSM", {"eps": 1 / 255}),                                   # the paper's setting
    "pgd": ("PGD", {"eps": 4 / 255, "alpha": 1 / 255, "steps": 10, "random_start": True}),
    "pgd_l2": ("PGDL2", {"eps": 0.5, "alpha": 0.1, "steps": 10, "random_start": True}),
    "cw": ("CW", {"c": 1.0, "kappa": 0.0, "steps": 50, "lr": 0.01}),
    "autoattack": ("AutoAttack", {"norm": "Linf", "eps": 4 / 255, "version": "standard"}),
}


def make_attack(parts, name: str, seed: int = 0, **kw):
    if name not in ATTACKS:
        raise NsvitError(f"unknown attack {name!r} (attacks: {', '.join(ATTACKS)})")
    if kw.get("eps", 0) < 0:
        raise NsvitError(f"attack eps must be >= 0, got {kw['eps']}")
    cls, defaults = ATTACKS[name]
    if name == "autoattack":  # it seeds itself
        kw.setdefault("seed", seed)
    return getattr(load_torchattacks(), cls)(parts, **{**defaults, **kw})


@torch.no_grad()
def accuracy(parts, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    was = parts.training
    parts.eval()
    dev = next(parts.parameters()).device
    hits = sum(int((parts(images[i:i + batch_size].to(dev)).argmax(-1).cpu() == labels[i:i + batch_size]).sum())
               for i in range(0, len(labels), batch_size))
    parts.train(was)
    return hits / len(labels)


def attack_accuracy(parts, images: torch.Tensor, labels: torch.Tensor, name: str, batch_size: int = 256,
                    seed: int = 0, **kw) -> float:
    """Accuracy on adversarial images made by attack ``name`` (seeded), batched."""
    was = parts.training
    parts.eval()
    atk = make_attack(parts, name, seed=seed, **kw)
    dev = next(parts.parameters()).device
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    hits = 0
    try:
        for i in range(0, len(labels), batch_size):
            x, y = images[i:i + batch_size].to(dev), labels[i:i + batch_size].to(dev)
            x_adv = atk(x, y)  # needs gradients: outside no_grad
            with torch.no_grad():
                hits += int((parts(x_adv).argmax(-1) == y).sum())
    finally:
        torch.set_rng_state(state)
        parts.train(was)
    return hits / len(labels)
