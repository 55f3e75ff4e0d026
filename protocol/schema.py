"""Typed conversion of plain data (decoded msgpack, JSON, TOML) into dataclasses.

Every message and config section is a dataclass; `from_plain` checks each value against
the field's type hint and refuses unknown keys, so bad input fails with the path of the
offending key instead of surfacing later as an AttributeError deep inside a handler.
`from_plain` stops at the first problem (messages are decoded on the hot path);
`load_toml` reports every problem of a config file at once (a person fixes them).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable
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
    """Yielded by a dataclass's `problems()`: the value of one of its fields is refused."""

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


Converter = Callable[[Any], Any]  # plain value -> typed value, or SchemaError


def _under(key: str | int, exc: SchemaError) -> SchemaError:
    """The same error, one level up: its path gets `key` in front. Paths are only
    built when something is wrong, so a valid message costs no string work."""
    head = f"[{key}]" if isinstance(key, int) else key
    if not exc.path:
        path = head
    elif exc.path.startswith("["):
        path = head + exc.path
    else:
        path = f"{head}.{exc.path}"
    return SchemaError(path, exc.reason)


def _scalar(tp: type) -> Converter:
    """A converter for str/bytes/bool: exactly that type (bool is not an int here)."""
    name = _type_name(tp())

    def convert(value: Any) -> Any:
        if type(value) is tp or (isinstance(value, tp) and not isinstance(value, bool)):
            return value
        raise SchemaError("", f"expected {name}, got {_type_name(value)}")

    return convert


def _int(value: Any) -> int:
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SchemaError("", f"expected an integer, got {_type_name(value)}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise SchemaError("", "integer out of the signed 64-bit range")
    return value


def _float(value: Any) -> float:
    if type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SchemaError("", f"expected a number, got {_type_name(value)}")
        value = float(value)
    number: float = value
    if not math.isfinite(number):
        raise SchemaError("", "expected a finite number")
    return number


def _any(value: Any) -> Any:
    return value


@cache
def _converter(tp: Any) -> Converter:
    """The converter for type hint `tp`, built once per type: decoding a message then
    costs a few calls per value, not a walk through `typing` for each one."""
    if tp is Any:
        return _any
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        optional = type(None) in args
        choices = [_converter(arg) for arg in args if arg is not type(None)]
        if optional and len(choices) == 1:  # `X | None`, the common case: no loop
            (only,) = choices

            def optional_of(value: Any) -> Any:
                return None if value is None else only(value)

            return optional_of

        def union(value: Any) -> Any:
            if value is None and optional:
                return None
            errors = []
            for choice in choices:
                try:
                    return choice(value)
                except SchemaError as exc:
                    errors.append(exc.reason)
            raise SchemaError("", " or ".join(errors))

        return union
    if origin is list:
        item = _converter(typing.get_args(tp)[0])

        def list_of(value: Any) -> list[Any]:
            if not isinstance(value, list | tuple):
                raise SchemaError("", f"expected a list, got {_type_name(value)}")
            if item is _any:
                return list(value)
            try:
                return [item(v) for v in value]
            except SchemaError:
                for i, v in enumerate(value):
                    try:
                        item(v)
                    except SchemaError as exc:
                        raise _under(i, exc) from None
                raise

        return list_of
    if origin is dict:
        val = _converter(typing.get_args(tp)[1])

        def dict_of(value: Any) -> dict[str, Any]:
            if not isinstance(value, dict):
                raise SchemaError("", f"expected a table, got {_type_name(value)}")
            for k in value:
                if not isinstance(k, str):
                    raise SchemaError("", f"keys must be strings, got {_type_name(k)}")
            if val is _any:
                return dict(value)
            out = {}
            for k, v in value.items():
                try:
                    out[k] = val(v)
                except SchemaError as exc:
                    raise _under(k, exc) from None
            return out

        return dict_of
    if dataclasses.is_dataclass(tp):
        return _dataclass_converter(tp)  # type: ignore[arg-type]
    if tp is int:
        return _int
    if tp is float:
        return _float
    if tp in (bool, str, bytes):
        return _scalar(tp)
    raise TypeError(f"unsupported type in schema: {tp!r}")


def _builder(cls: type) -> Callable[[dict[str, Any]], Any]:
    """How to make `cls` from its converted field values: its `__init__`; for a frozen
    dataclass (every protocol message), the same object made by filling its `__dict__`,
    which saves a frozen `__init__`'s `object.__setattr__` per field (decoding records
    is the control plane's hot path)."""
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    if not params.frozen or hasattr(cls, "__post_init__") or "__slots__" in vars(cls):
        return lambda values: cls(**values)
    fields = dataclasses.fields(cls)
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    factories = [
        (f.name, f.default_factory) for f in fields if f.default_factory is not dataclasses.MISSING
    ]
    new = object.__new__

    def build(values: dict[str, Any]) -> Any:
        obj: Any = new(cls)
        state = obj.__dict__
        state.update(defaults)
        for name, factory in factories:
            if name not in values:
                state[name] = factory()
        state.update(values)
        return obj

    return build


def _required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _dataclass_converter(cls: type) -> Converter:
    hints = _hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    specs = [(f.name, _converter(hints[f.name]), _required(f)) for f in fields]
    has_problems = hasattr(cls, "problems")
    build = _builder(cls)

    def convert(data: Any) -> Any:
        if not isinstance(data, dict):
            raise SchemaError("", f"expected a table, got {_type_name(data)}")
        if not names.issuperset(data):
            unknown = next(key for key in data if key not in names)
            raise SchemaError(str(unknown), unknown_key(unknown, names))
        kwargs = {}
        for name, field_converter, required in specs:
            if name in data:
                try:
                    kwargs[name] = field_converter(data[name])
                except SchemaError as exc:
                    raise _under(name, exc) from None
            elif required:
                raise SchemaError(name, "required key is missing")
        obj = build(kwargs)
        if has_problems:
            first = next(obj.problems(), None)
            if first is not None:
                raise SchemaError(first.field, str(first))
        return obj

    return convert


def unknown_key(key: object, names: Iterable[str]) -> str:
    """The problem with a key no field has, naming the nearest one when the key looks
    like a typo of it: a person fixes `max_concurent_runs` faster when told which."""
    close = difflib.get_close_matches(str(key), sorted(names), n=1)
    return f"unknown key; did you mean {close[0]}?" if close else "unknown key"


def from_plain(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from a plain mapping, validating types; unknown keys are errors.
    `path`: where `data` sits in a larger document, for the error message."""
    try:
        hint: Any = cls  # a class is hashable, whatever the type checker makes of type[T]
        typed: T = _converter(hint)(data)
        return typed
    except SchemaError as exc:
        if not path:
            raise
        raise SchemaError(_join(path, exc.path) if exc.path else path, exc.reason) from None


Plainer = Callable[[Any], Any]


def _to_plain_any(obj: Any) -> Any:
    """For values typed `Any` (or a union): whatever they hold, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plainer(type(obj))(obj)
    if isinstance(obj, list | tuple):
        return [_to_plain_any(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain_any(v) for k, v in obj.items()}
    return obj


@cache
def _plainer(tp: Any) -> Plainer:
    """The inverse of `_converter`, also built once per type."""
    origin = typing.get_origin(tp)
    if origin is list:
        item = _plainer(typing.get_args(tp)[0])
        if item is _same:
            return list
        return lambda value: [item(v) for v in value]
    if origin is dict:
        val = _plainer(typing.get_args(tp)[1])
        if val is _same:
            return dict
        return lambda value: {k: val(v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)  # type: ignore[arg-type]
        specs = [(f.name, _plainer(hints[f.name])) for f in dataclasses.fields(tp)]
        return lambda obj: {name: plain(getattr(obj, name)) for name, plain in specs}
    if tp in (int, float, str, bytes, bool):
        return _same
    return _to_plain_any


def _same(value: Any) -> Any:
    return value


def to_plain(obj: Any) -> Any:
    """The inverse of `from_plain`: dataclasses become dicts, recursively."""
    return _to_plain_any(obj)


_INVALID = object()  # what `_collect` returns for a value it could not convert


def _collect(tp: Any, value: Any, path: str, found: list[SchemaError]) -> Any:
    """Convert `value` to `tp`, appending each problem to `found`: dataclasses, lists and
    tables are walked item by item, other types are converted as by `from_plain`."""
    if dataclasses.is_dataclass(tp):
        return _collect_dataclass(tp, value, path, found)  # type: ignore[arg-type]
    origin = typing.get_origin(tp)
    if origin is list and isinstance(value, list | tuple):
        item = typing.get_args(tp)[0]
        converted = [_collect(item, v, _join(path, i), found) for i, v in enumerate(value)]
        return [v for v in converted if v is not _INVALID]
    if origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        val = typing.get_args(tp)[1]
        items = {k: _collect(val, v, _join(path, k), found) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not _INVALID}
    try:
        return _converter(tp)(value)
    except SchemaError as exc:
        found.append(_under(path, exc) if path else exc)
        return _INVALID


def _collect_dataclass(cls: type, data: Any, path: str, found: list[SchemaError]) -> Any:
    """A field whose value is unusable keeps its default, so that the object's own
    `problems()` still run; those about such a field (already reported) are left out."""
    if not isinstance(data, dict):
        found.append(SchemaError(path, f"expected a table, got {_type_name(data)}"))
        return _INVALID
    fields, hints = dataclasses.fields(cls), _hints(cls)
    names = {f.name for f in fields}
    found.extend(
        SchemaError(_join(path, str(key)), unknown_key(key, names))
        for key in data
        if key not in names
    )
    kwargs = {}
    for field in fields:
        if field.name in data:
            value = _collect(hints[field.name], data[field.name], _join(path, field.name), found)
            if value is not _INVALID:
                kwargs[field.name] = value
        elif _required(field):
            found.append(SchemaError(_join(path, field.name), "required key is missing"))
    if any(_required(f) and f.name not in kwargs for f in fields):
        return _INVALID
    obj = cls(**kwargs)
    unusable = data.keys() - kwargs.keys()
    own = obj.problems() if hasattr(obj, "problems") else ()
    found.extend(
        SchemaError(_join(path, problem.field), str(problem))
        for problem in own
        if problem.field not in unusable
    )
    return obj


class ConfigError(ValueError):
    """A config file is unreadable or invalid: one line per problem (`lines`), each
    naming the file and the key, so that all of them can be fixed in one go."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def load_toml(path: str, cls: type[T]) -> T:
    """Read a TOML file into dataclass `cls`; every problem is named with the file and key."""
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
    found: list[SchemaError] = []
    obj: T = _collect(cls, data, "", found)
    if found:  # else `obj` is whole: `_collect` gives up on a value only after a problem
        raise ConfigError(*(f"{path}: key {exc.path!r}: {exc.reason}" for exc in found))
    return obj
