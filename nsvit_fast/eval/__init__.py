"""Evaluation: attacks in pixel space, corruptions and mCE, OOD folders, nullspace metrics, reports."""

from .attacks import ATTACKS, accuracy, attack_accuracy, make_attack
from .corruptions import ALEXNET_ERR, CORRUPTIONS, corrupt, mce, mce_imagenet
from .report import Report
from .suite import SUITES, evaluate, parse_suite

__all__ = ["ATTACKS", "accuracy", "attack_accuracy", "make_attack", "ALEXNET_ERR", "CORRUPTIONS", "corrupt",
           "mce", "mce_imagenet", "Report", "SUITES", "evaluate", "parse_suite"]
