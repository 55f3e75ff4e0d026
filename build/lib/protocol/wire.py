"""Which plain values can cross the wire, checked where they enter the system.

User data rides inside protocol messages as `Any`-typed payloads: a run's config (in
LaunchRun, WorkerSpec and a sensor's RequestedRun) and an event's data (in RunRecord and
EventBatch). Whatever the control plane accepts must reach an agent, and whatever a
worker emits must reach the control plane, so the codec's rules are applied at the door
rather than discovered at delivery:

- `payload_problem` refuses a payload with the path of the first value that would not
  arrive: a type msgpack does not carry, text that is not UTF-8 (a lone surrogate), an
  integer outside 64 bits, a number that is not finite, a string, list or map over the
  decode limits, or nesting deeper than `PAYLOAD_DEPTH`;
- `delivery_problem` encodes a whole message and decodes it as its receiver would;
- `make_deliverable` turns what user code produced into something that will arrive.
"""

from __future__ import annotations

import math
from typing import Any

from protocol.codec import DEFAULT_LIMITS, DecodeLimits, ProtocolError, decode_any, encode
from protocol.schema import INT64_MAX, INT64_MIN

# A payload sits at most this deep in any message: envelope body -> list -> message.
PAYLOAD_OFFSET = 3
PAYLOAD_DEPTH = DEFAULT_LIMITS.max_depth - PAYLOAD_OFFSET
"""Levels a payload may have, counting the payload itself as 1."""

_SCALARS = (type(None), bool, str, bytes, int, float)


def _join(path: str, key: object) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


def text_problem(text: str, limit: int = DEFAULT_LIMITS.max_str_len) -> str | None:
    """Why `text` cannot travel: not UTF-8 (a lone surrogate), or over `limit` bytes."""
    try:
        size = len(text.encode())
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("unicode_escape").decode()
        return f"is not valid Unicode text (a lone surrogate {bad} at character {exc.start})"
    if size > limit:
        return f"is {size} bytes of UTF-8, over the limit of {limit}"
    return None


def _scalar_problem(value: Any, limits: DecodeLimits) -> str | None:
    kind = type(value)
    if kind is str:
        return text_problem(value, limits.max_str_len)
    if kind is int:
        return None if INT64_MIN <= value <= INT64_MAX else "is outside the signed 64-bit range"
    if kind is float:
        return None if math.isfinite(value) else "is not a finite number"
    if kind is bytes and len(value) > limits.max_bin_len:
        return f"is {len(value)} bytes, over the limit of {limits.max_bin_len}"
    return None


def payload_problem(
    value: Any,
    where: str,
    depth: int = PAYLOAD_DEPTH,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> str | None:
    """What in `value` could not be delivered, named by its path under `where`; None if
    all of it can. Walks iteratively: a hostile payload may be nested thousands deep."""
    stack: list[tuple[Any, str, int]] = [(value, where, 1)]
    while stack:
        item, path, level = stack.pop()
        if level > depth:
            return f"{path} is nested deeper than {depth} levels"
        kind = type(item)
        if kind is dict:
            if len(item) > limits.max_map_len:
                return f"{path} has {len(item)} keys, over the limit of {limits.max_map_len}"
            for key, child in item.items():
                if type(key) is not str:
                    return f"{path} has a key that is not a string ({key!r})"
                if (problem := text_problem(key, limits.max_str_len)) is not None:
                    return f"{path} has a key that {problem}"
                stack.append((child, _join(path, key), level + 1))
        elif kind is list or kind is tuple:
            if len(item) > limits.max_array_len:
                return f"{path} has {len(item)} items, over the limit of {limits.max_array_len}"
            stack.extend((child, _join(path, i), level + 1) for i, child in enumerate(item))
        elif kind in _SCALARS:
            if (problem := _scalar_problem(item, limits)) is not None:
                return f"{path} {problem}"
        else:
            return f"{path} is a {kind.__name__}, which the protocol cannot carry"
    return None


def delivery_problem(message: Any, limits: DecodeLimits = DEFAULT_LIMITS) -> str | None:
    """Why `message` would not reach a receiver decoding with `limits`; None if it would."""
    try:
        decode_any(encode(message), limits)
    except ProtocolError as exc:
        return str(exc)
    return None


MAX_REPR = 2000


def _safe_text(text: str, limit: int) -> str:
    if text_problem(text, limit) is None:
        return text
    fixed = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    data = fixed.encode()
    if len(data) > limit:
        fixed = data[: max(0, limit - 64)].decode("utf-8", "ignore") + " [truncated]"
    return fixed


def make_deliverable(
    value: Any, depth: int = PAYLOAD_DEPTH, limits: DecodeLimits = DEFAULT_LIMITS
) -> Any:
    """`value` with whatever would not arrive replaced: text made valid UTF-8 and cut to
    size, out-of-range numbers and other objects (and what sits too deep) as a repr."""
    kind = type(value)
    if kind in (dict, list, tuple) and value and depth <= 1:  # its items would sit too deep
        return _safe_text(repr(value)[:MAX_REPR], limits.max_str_len)
    if kind is dict:
        items = list(value.items())[: limits.max_map_len]
        return {
            _safe_text(str(k), limits.max_str_len): make_deliverable(v, depth - 1, limits)
            for k, v in items
        }
    if kind is list or kind is tuple:
        return [make_deliverable(v, depth - 1, limits) for v in value[: limits.max_array_len]]
    if kind is str:
        return _safe_text(value, limits.max_str_len)
    if kind in _SCALARS and _scalar_problem(value, limits) is None:
        return value
    return _safe_text(repr(value)[:MAX_REPR], limits.max_str_len)
