"""Model families: each maps a predicate on the timm model to its adapter class.

A new family (say, an EVA adapter) is one file in ``nsvit_fast/models/`` and one entry here.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import NsvitError
from . import vit
from .base import Adapter

FAMILIES: dict[str, tuple[Callable[[nn.Module], bool], type[Adapter]]] = {
    "vit": (vit.matches, vit.VitAdapter),
}


def family_of(model: nn.Module) -> str | None:
    for fam, (match, _) in FAMILIES.items():
        if match(model):
            return fam
    return None


def adapt(model: nn.Module, mean=None, std=None, name: str = "") -> Adapter:
    """Wrap a timm model into its adapter. mean/std default to the model's timm data config."""
    if isinstance(model, Adapter):
        return model
    name = name or getattr(model, "default_cfg", {}).get("architecture", "") or type(model).__name__
    fam = family_of(model)
    if fam is None:
        raise NsvitError(f"{name}: model class {type(model).__name__} is not a supported family "
                         f"(supported: {', '.join(FAMILIES)}: timm VisionTransformer and its subclasses)")
    if mean is None or std is None:
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        mean = cfg["mean"] if mean is None else mean
        std = cfg["std"] if std is None else std
    return FAMILIES[fam][1](model, mean, std, name)
