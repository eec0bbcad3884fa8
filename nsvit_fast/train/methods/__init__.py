"""Finetuning methods by name: ns (the paper's), plain, random, pgd (Madry), trades.

``METHODS`` is the registry; ``MethodConfigs`` holds one nested config per method that has
hyperparameters, and FinetuneConfig inherits it, so YAML reads ``pgd: {eps: 0.0078}`` like ``synth``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import NsvitError
from .base import Method, RoundContext
from .ns import NS, fused_views
from .pgd import PGD, PGDConfig
from .plain import Plain
from .random_noise import RandomConfig, RandomNoise
from .trades import TRADES, TRADESConfig

METHODS: dict[str, type[Method]] = {m.name: m for m in (NS, Plain, RandomNoise, PGD, TRADES)}
DEFAULT_METHOD = NS.name  # the paper's


@dataclass
class MethodConfigs:
    """The methods' own hyperparameters, one field per method with a Config, named after it."""

    random: RandomConfig = field(default_factory=RandomConfig)
    pgd: PGDConfig = field(default_factory=PGDConfig)
    trades: TRADESConfig = field(default_factory=TRADESConfig)


def get_method(name: str, config: Any = None) -> Method:
    """A fresh instance of method ``name`` with ``config`` (its Config's defaults when None).
    Raises NsvitError naming the methods for an unknown name."""
    if name not in METHODS:
        raise NsvitError(f"unknown method {name!r} (methods: {', '.join(METHODS)})")
    return METHODS[name](config)


def method_for(cfg: MethodConfigs, name: str) -> Method:
    """Method ``name`` with its nested config taken from ``cfg`` (a FinetuneConfig; None for a
    method without one). Raises NsvitError for an unknown name, as :func:`get_method`."""
    return get_method(name, getattr(cfg, name, None))


def check_method_configs(cfg: MethodConfigs) -> None:
    """Every nested method config checks itself; raises NsvitError on the first bad value."""
    for m in METHODS.values():
        if m.Config is not None:
            if not hasattr(cfg, m.name):  # a method added to METHODS without its settings' home
                raise NsvitError(f"method {m.name!r} has a Config but MethodConfigs has no field {m.name!r} for it: "
                                 f"add `{m.name}: {m.Config.__name__} = field(default_factory={m.Config.__name__})`")
            getattr(cfg, m.name).check()


def moved_key_error(key: str) -> NsvitError | None:
    """The error for an old flat key (``pgd_eps``) that moved into a method's config, else None."""
    new = [f"{m.name}.{m.moved_keys[key]}" for m in METHODS.values() if key in m.moved_keys]
    if not new:
        return None
    return NsvitError(f"finetune key {key!r} moved into the method's own config: use {' and '.join(new)} "
                      f"(in YAML a nested mapping, e.g. {new[0].split('.')[0]}: {{{new[0].split('.')[1]}: ...}})")


__all__ = ["METHODS", "DEFAULT_METHOD", "Method", "MethodConfigs", "RoundContext", "get_method", "method_for",
           "check_method_configs", "moved_key_error", "fused_views"]
