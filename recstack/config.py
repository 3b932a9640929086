"""Dataclass configs: `--set key=value` overrides checked against the fields, (de)serialisation."""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Iterable, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad override: unknown key or a value that does not parse as the field's type."""


def _parse(value: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if typ in (int, float, str):
        try:
            return typ(float(value)) if typ is int and "e" in value.lower() else typ(value)
        except ValueError:
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(typ) or (str,)
        parts = [p for p in value.strip("()[] ").split(",") if p.strip()]
        return origin(_parse(p.strip(), inner, key) for p in parts)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.strip().lower() in ("none", "null"):
            return None
        return _parse(value, args[0], key)
    raise ConfigError(f"{key}: cannot parse a value for type {typ}")


def apply_overrides(cfg: T, overrides: Iterable[str] | None) -> T:
    """Return a copy of dataclass `cfg` with `key=value` overrides applied.

    An unknown key is an error that names the valid ones.
    """
    if not overrides:
        return cfg
    hints = typing.get_type_hints(type(cfg))
    names = [f.name for f in dataclasses.fields(cfg)]
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in names:
            raise ConfigError(f"unknown config key {key!r} for {type(cfg).__name__}; valid keys: {', '.join(sorted(names))}")
        changes[key] = _parse(value, hints[key], key)
    out = dataclasses.replace(cfg, **changes)
    validate = getattr(out, "validate", None)
    if callable(validate):
        validate()
    return out


def to_dict(cfg: Any) -> dict:
    """Dataclass -> plain dict of JSON types (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(cls: type[T], d: dict) -> T:
    """Plain dict -> dataclass; unknown keys are an error, missing ones take the defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for k, v in d.items():
        origin = typing.get_origin(hints[k])
        kwargs[k] = tuple(v) if origin is tuple and isinstance(v, list) else v
    return cls(**kwargs)
