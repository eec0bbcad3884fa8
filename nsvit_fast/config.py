"""Plain dataclass configs: build them from keyword overrides or YAML with unknown keys named and
every value checked against its field's type."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Mapping, TypeVar

from .errors import NsvitError

T = TypeVar("T")


def _typename(tp) -> str:
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def check_type(name: str, value: Any, tp) -> Any:
    """``value`` converted to the field type ``tp`` (int, float, str, bool, a dataclass, Optional, list),
    or NsvitError naming the key. Whole floats (``2.0``) are ints; NaN and inf are refused for numbers;
    bool is not a number and 1 is not a bool."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_type(name, value, inner[0]) if len(inner) == 1 else value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise NsvitError(f"{name} must be a list, got {value!r}")
        return type(value)(check_type(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)) if args else value
    if tp is bool:
        if not isinstance(value, bool):
            raise NsvitError(f"{name} must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and tp is int and isinstance(value, float):
            ok = value.is_integer()
        if not ok:
            raise NsvitError(f"{name} must be {_typename(tp)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise NsvitError(f"{name} must be a finite number, got {value!r}")
        try:
            return tp(value)
        except OverflowError:  # an int past float's range (10**400): math.isfinite raised it bare
            raise NsvitError(f"{name} is too large, got an integer of {len(str(abs(value)))} digits") from None
    if tp is str:
        if not isinstance(value, str):
            raise NsvitError(f"{name} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        raise NsvitError(f"{name} must be a mapping of {tp.__name__} keys, got {value!r}")
    return value


def build(cls: type[T], base: T | None = None, overrides: Mapping[str, Any] | None = None,
          where: str = "") -> T:
    """``cls`` from ``base`` (or defaults) with ``overrides`` applied; an unknown key is an error
    that names it and its nearest valid key, and a value of the wrong type (``rounds=abc``,
    ``rounds=1.7``, ``synth=5``) is an error that names the key and the type wanted."""
    if overrides is not None and not isinstance(overrides, Mapping):
        raise NsvitError(f"{where or cls.__name__} settings must be a mapping of keys, got {overrides!r}")
    if isinstance(base, Mapping):  # config={"eps": 0.03}: the same as keyword overrides
        base, overrides = None, {**base, **(overrides or {})}
    if base is not None and not isinstance(base, cls):
        raise NsvitError(f"{where or cls.__name__} config must be a {cls.__name__} or a mapping of its keys, "
                         f"got {type(base).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    checked = {}
    for k, v in (overrides or {}).items():
        if k not in names:
            near = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (valid: {', '.join(names)})"
            raise NsvitError(f"unknown {where or cls.__name__} key {k!r}{hint}")
        checked[k] = check_type(f"synth.{k}" if where == "synth" else k, v, hints[k])
    obj = base if base is not None else cls()
    return dataclasses.replace(obj, **checked)


__all__ = ["check_type", "build"]
