"""Plain dataclass configs: build them from keyword overrides or YAML with unknown keys named."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, TypeVar

from .errors import NsvitError

T = TypeVar("T")


def build(cls: type[T], base: T | None = None, overrides: Mapping[str, Any] | None = None,
          where: str = "") -> T:
    """``cls`` from ``base`` (or defaults) with ``overrides`` applied; an unknown key is an error
    that names it and its nearest valid key."""
    names = [f.name for f in dataclasses.fields(cls)]
    for k in overrides or {}:
        if k not in names:
            near = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (valid: {', '.join(names)})"
            raise NsvitError(f"unknown {where or cls.__name__} key {k!r}{hint}")
    obj = base if base is not None else cls()
    return dataclasses.replace(obj, **dict(overrides or {}))
