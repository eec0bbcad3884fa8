"""Finetuning methods by name: ns (the paper's), plain, random, pgd (Madry), trades."""

from __future__ import annotations

from ...errors import NsvitError
from .base import Method
from .ns import NS, fused_views
from .pgd import PGD
from .plain import Plain
from .random_noise import RandomNoise
from .trades import TRADES

METHODS: dict[str, type[Method]] = {m.name: m for m in (NS, Plain, RandomNoise, PGD, TRADES)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise NsvitError(f"unknown method {name!r} (methods: {', '.join(METHODS)})")
    return METHODS[name]()


__all__ = ["METHODS", "Method", "get_method", "fused_views"]
