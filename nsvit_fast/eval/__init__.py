"""Evaluation: attacks in pixel space, corruptions and mCE, OOD folders, nullspace metrics, reports.

``SUITES`` is the registry of named suites (``evaluate`` runs them), ``ATTACKS`` the registry of
attacks (``attack_accuracy`` runs them); ``accuracy`` and ``eval_mode`` are the one accuracy loop
and mode switch the whole package uses.
"""

from .accuracy import accuracy, eval_mode
from .attacks import ATTACKS, AttackSpec, attack_accuracy, from_torchattacks, make_attack
from .corruptions import ALEXNET_ERR, CORRUPTIONS, corrupt, mce, mce_imagenet
from .report import Report
from .suite import DEFAULT_SUITES, SUITES, Suite, evaluate, parse_suite, register_attack, suite_help

__all__ = ["ATTACKS", "AttackSpec", "accuracy", "eval_mode", "attack_accuracy", "from_torchattacks", "make_attack",
           "ALEXNET_ERR", "CORRUPTIONS", "corrupt", "mce", "mce_imagenet", "Report", "DEFAULT_SUITES", "SUITES",
           "Suite", "evaluate", "parse_suite", "register_attack", "suite_help"]
