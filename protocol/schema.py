"""Typed conversion of plain data (decoded msgpack, JSON, TOML) into dataclasses.

Every message and config section is a dataclass; `from_plain` checks each value against
the field's type hint and refuses unknown keys, so bad input fails with the path of the
offending key instead of surfacing later as an AttributeError deep inside a handler.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import cache
from typing import Any, TypeVar, Union

T = TypeVar("T")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what every integer field must fit (databases)


class SchemaError(ValueError):
    """A value does not fit its declared type; `path` names the key (e.g. `runs[2].lease`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.reason = message


class FieldError(ValueError):
    """Raised by a dataclass's `check()` to reject the value of one of its fields."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
        bytes: "bytes",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _convert(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except SchemaError as exc:
                errors.append(exc.reason)
        raise SchemaError(path, " or ".join(errors))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise SchemaError(path, f"expected a list, got {_type_name(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, _join(path, i)) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(path, f"expected a table, got {_type_name(value)}")
        _key_tp, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SchemaError(path, f"keys must be strings, got {_type_name(k)}")
            out[k] = _convert(val_tp, v, _join(path, k))
        return out
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(path, f"expected a boolean, got {_type_name(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(path, f"expected an integer, got {_type_name(value)}")
        if not INT64_MIN <= value <= INT64_MAX:
            raise SchemaError(path, "integer out of the signed 64-bit range")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SchemaError(path, f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise SchemaError(path, "expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(path, f"expected a string, got {_type_name(value)}")
        return value
    if tp is bytes:
        if not isinstance(value, bytes):
            raise SchemaError(path, f"expected bytes, got {_type_name(value)}")
        return value
    raise TypeError(f"unsupported type in schema: {tp!r}")


def from_plain(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from a plain mapping, validating types; unknown keys are errors."""
    if not isinstance(data, dict):
        raise SchemaError(path, f"expected a table, got {_type_name(data)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise SchemaError(_join(path, str(key)), "unknown key")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SchemaError(_join(path, name), "required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except FieldError as exc:
            raise SchemaError(_join(path, exc.field), str(exc)) from None
    return obj


def to_plain(obj: Any) -> Any:
    """The inverse of `from_plain`: dataclasses become dicts, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


class ConfigError(ValueError):
    """A config file is unreadable or invalid; the message names the file and the key."""


def load_toml(path: str, cls: type[T]) -> T:
    """Read a TOML file into dataclass `cls`; errors name the file and the offending key."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return from_plain(cls, data)
    except SchemaError as exc:
        raise ConfigError(f"{path}: key {exc.path!r}: {exc.reason}") from None
