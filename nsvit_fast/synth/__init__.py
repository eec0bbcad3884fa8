"""Noise synthesis: ε-approximate nullspace noise (reference and fast modes), NoiseBank, metrics."""

from .bank import NoiseBank
from .cache import CleanCache
from .engine import SynthConfig, synthesize, synthesize_regularized
from .metrics import noise_effect, scale_to_eps
from .profile import profile_synth

__all__ = ["NoiseBank", "CleanCache", "SynthConfig", "synthesize", "synthesize_regularized", "noise_effect", "scale_to_eps",
           "profile_synth"]
