"""A YAML or command-line value converted to a config field's declared type (``megarl.config``'s overrides)."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import yaml


def coerce(value: Any, annotation, key: str):
    """A YAML or command-line value converted to the declared type; ValueError naming the key otherwise."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(map(repr, args))}.")
        return value
    if annotation is bool or annotation == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{key}={value!r} is not a boolean (true/false).")
    if annotation in (int, float):
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, bool) or (annotation is int and float(number) != int(float(number))):
                raise ValueError
            return annotation(number) if annotation is float else int(float(number))
        except (TypeError, ValueError):
            raise ValueError(f"{key}={value!r} is not a valid {annotation.__name__}.") from None
    if annotation is str:
        return str(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]()").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={value!r} must be a list, e.g. {key}=a,b or a YAML list.")
        return tuple(coerce(v, args[0], key) for v in value)
    if annotation is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r} must be a mapping, e.g. {key}='{{clip_high: 0.28}}'.")
        return dict(value)
    return value
