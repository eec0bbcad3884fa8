"""Finetuning: Algorithm 1 (ns) and the baselines (plain, random, pgd, trades) on one engine."""

from .engine import FinetuneConfig, FinetuneResult, finetune, make_config
from .methods import METHODS, Method, RoundContext, get_method

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "make_config", "METHODS", "Method", "RoundContext",
           "get_method"]
