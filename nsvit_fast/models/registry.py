"""Model families: each maps a predicate on the timm model to its adapter class.

A new family is one file in ``nsvit_fast/models/`` and one entry here (``eva.py`` is one), plus a
small example in ``FAMILY_EXAMPLES`` of tests/test_adapter.py and its file named in the README's
Layout (README: "Adding a family, method, attack or op").
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import NsvitError
from . import eva, vit
from .base import Adapter

# family name -> (predicate on the timm model, adapter class); adapt() takes the first that matches
FAMILIES: dict[str, tuple[Callable[[nn.Module], bool], type[Adapter]]] = {
    "vit": (vit.matches, vit.VitAdapter),
    "eva": (eva.matches, eva.EvaAdapter),
}


def family_of(model: nn.Module) -> str | None:
    """The name of the family (a key of ``FAMILIES``) whose predicate ``model`` meets, or None."""
    for fam, (match, _) in FAMILIES.items():
        if match(model):
            return fam
    return None


def _default_tag(arch: str) -> str | None:
    """The pretrained tag timm gives ``arch`` when none is named (None where timm knows none)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(arch)
    except (RuntimeError, KeyError, ValueError):
        return None
    return getattr(cfg, "tag", None) if cfg is not None else None


def adapt(model: nn.Module, mean=None, std=None, name: str = "", *, arch: str | None = None,
          model_kwargs: dict[str, Any] | None = None) -> Adapter:
    """Wrap a timm model into its family's adapter (an adapter is returned as it is).

    Args:
        model: a timm model of a supported family (``FAMILIES``).
        mean, std: normalisation, C values each; by default the model's timm data config's.
        name: how reports name it; by default timm's architecture name.
        arch, model_kwargs: the record that rebuilds it (``Adapter``); by default the name (with
            timm's pretrained tag where the model was built with another than the default one,
            since the tag sets its crop and interpolation), and ``model_kwargs`` None: settings
            unrecorded, so ``save_model``'s file needs the model name given again to ``load_model``.

    Raises:
        NsvitError: a model of no supported family, or one its family's adapter cannot serve
            (e.g. a non-linear or overlapping patch stem).
    """
    if not isinstance(model, nn.Module):
        raise NsvitError(f"expected a timm ViT or an adapter (load_model(...)), got {type(model).__name__}"
                         + (" (a name: use load_model)" if isinstance(model, str) else ""))
    if isinstance(model, Adapter):
        if mean is not None or std is not None:  # its normalisation is part of the adapter: not silently kept
            raise NsvitError(f"{model.name} is already adapted, with its own mean/std; adapt the timm model "
                             f"(adapter.model) to give others")
        return model
    pcfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    base = pcfg.get("architecture", "")
    name = name or base or type(model).__name__
    if arch is None and base and pcfg.get("tag") and pcfg["tag"] != _default_tag(base):
        arch = f"{base}.{pcfg['tag']}"  # a tag other than the default sets crop_pct and interpolation: kept
    fam = family_of(model)
    if fam is None:
        raise NsvitError(f"{name}: model class {type(model).__name__} is not a supported family "
                         f"(supported: {'; '.join(f'{f}: {c.serves}' for f, (_, c) in FAMILIES.items())})")
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    mean = cfg["mean"] if mean is None else mean
    std = cfg["std"] if std is None else std
    parts = FAMILIES[fam][1](model, mean, std, name, arch=arch, model_kwargs=model_kwargs, data_config=cfg)
    parts.training = model.training  # a new Module starts in train mode: code that restores modes would train the model
    return parts
