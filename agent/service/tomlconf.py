"""TOML to a tree of frozen dataclasses, for the agent's and the relay's configuration.

Every table and key maps to one dataclass and field; unknown keys and wrong types are
``ConfigError`` naming the key, so a typo never silently does nothing. Field types may be
``bool``/``int``/``float``/``str``, ``Literal[...]``, ``tuple[X, ...]``, ``frozenset[X]``,
``X | None`` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


def _convert(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{where}: expected one of {choices}, got {value!r}")
        return value
    if origin in (tuple, frozenset):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array")
        item = typing.get_args(tp)[0]
        return origin(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (isinstance(tp, type) and not isinstance(value, tp)) or (
        tp is int and isinstance(value, bool)
    ):
        raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a parsed TOML table, checking keys and types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)}")
    kwargs = {
        key: _convert(hints[key], value, f"{where}.{key}" if where else key)
        for key, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, table by table."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed file; an unreadable or malformed one is a ``ConfigError``."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def to_plain(obj: Any) -> Any:
    """A dataclass tree as TOML-shaped data: tables as dicts, tuples and sets as lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, frozenset | set):
        return sorted((to_plain(v) for v in obj), key=repr)
    return obj


def changed_keys(old: Any, new: Any) -> list[str]:
    """The dotted keys of the leaves (values that are not tables) that differ between two
    trees of the same dataclass, in field order."""
    return _changed(to_plain(old), to_plain(new), "")


def _changed(old: Any, new: Any, where: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [*old, *(k for k in new if k not in old)]
        return [c for k in keys for c in _changed(old.get(k), new.get(k), f"{where}{k}.")]
    return [] if old == new else [where.rstrip(".")]


def replace_key(obj: T, key: str, value: Any) -> T:
    """``obj`` with the dotted ``key`` (``calls.do_not_disturb``) set to ``value``, checked
    as if read from TOML (type conversion and each dataclass's own validation);
    ``ConfigError`` names the key on an unknown key, a table or a bad value."""
    parts = key.split(".")
    if not key or not all(parts):
        raise ConfigError(f"{key!r}: not a dotted key")
    return typing.cast(T, _replace(obj, parts, value, ""))


def _replace(obj: Any, parts: list[str], value: Any, where: str) -> Any:
    name, rest = parts[0], parts[1:]
    where = f"{where}.{name}" if where else name
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise ConfigError(f"{where}: unknown key")
    hints = typing.get_type_hints(type(obj))
    if name not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"{where}: unknown key")
    current = getattr(obj, name)
    if rest:
        new = _replace(current, rest, value, where)
    elif dataclasses.is_dataclass(current):
        raise ConfigError(f"{where}: is a table; set one of its keys")
    else:
        new = _convert(hints[name], value, where)
    try:
        return dataclasses.replace(obj, **{name: new})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
