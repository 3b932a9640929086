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


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    """One `--set` key: its name, type as written in the dataclass, value and comment."""

    name: str
    type: str
    value: Any
    comment: str


def _comments_by_line(source: str) -> dict[int, str]:
    """Line number (1-based) -> the text of the `#` comment on that line."""
    import io
    import tokenize

    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def field_docs(cfg: Any) -> list[FieldDoc]:
    """Every field of dataclass instance (or class) `cfg`, in declaration order, with the comment
    written beside it in the source: the comment at the end of its line, then the comment lines
    directly above it (section rules such as `# --- model ---` excluded)."""
    import ast
    import inspect
    import textwrap

    cls = cfg if isinstance(cfg, type) else type(cfg)
    comments: dict[int, str] = {}
    annotations: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # base classes first: a subclass's comment wins
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined where the source cannot be read (e.g. an interactive session)
            continue
        node = ast.parse(source).body[0]
        by_line = _comments_by_line(source)
        lines = source.splitlines()
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
                annotations[name] = ast.get_source_segment(source, stmt.annotation) or ast.unparse(stmt.annotation)
                above = []
                i = stmt.lineno - 1  # 1-based line above the field
                while i >= 1 and lines[i - 1].strip().startswith("#") and not by_line.get(i, "").startswith("---"):
                    above.append(by_line.get(i, ""))
                    i -= 1
                trailing = [by_line[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in by_line]
                own, context = " ".join(trailing).strip(), " ".join(reversed(above)).strip()
                comments[name] = f"{own} — {context}" if own and context else own or context
    fields = dataclasses.fields(cls)
    if isinstance(cfg, type):
        values = {f.name: f.default if f.default is not dataclasses.MISSING else
                  (f.default_factory() if f.default_factory is not dataclasses.MISSING else None) for f in fields}
    else:
        values = {f.name: getattr(cfg, f.name) for f in fields}
    return [FieldDoc(f.name, annotations.get(f.name, getattr(f.type, "__name__", str(f.type))), values[f.name],
                     comments.get(f.name, "")) for f in fields]


def as_setting(value: Any) -> str:
    """`value` written as `--set key=...` takes it (the inverse of the parsing above)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(as_setting(v) for v in value) if value else "()"
    return str(value)


def format_settings(cfg: Any, title: str) -> str:
    """A listing of every `--set` key of `cfg`: `key: type = value` then its comment, indented."""
    import textwrap

    lines = [title]
    for d in field_docs(cfg):
        lines.append(f"  {d.name} ({d.type}) = {as_setting(d.value)}")
        if d.comment:
            lines.extend(textwrap.wrap(d.comment, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)
