"""Evaluation: clean accuracy and accuracy under attacks in pixel space."""

from .attacks import ATTACKS, accuracy, attack_accuracy, make_attack

__all__ = ["ATTACKS", "accuracy", "attack_accuracy", "make_attack"]
