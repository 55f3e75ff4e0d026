"""The one msgpack codec: an envelope {v, type, body} with bounded, validated decoding.

Decoding never trusts its input: the body size, string/bin/array/map lengths and nesting
depth are bounded, ext types are refused, and the body must fit the expected message's
schema. Every problem raises `ProtocolError`, which servers turn into a 4xx.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import msgpack

from protocol import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS
from protocol.messages import FIELDS_SINCE, MESSAGE_TYPES, LaunchRun, PollReply
from protocol.schema import SchemaError, from_plain, to_plain

T = TypeVar("T")


class ProtocolError(ValueError):
    """A message could not be decoded; `code` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DecodeLimits:
    max_body_bytes: int = 8 * 1024 * 1024
    max_str_len: int = 1024 * 1024
    max_bin_len: int = 1024 * 1024
    max_array_len: int = 100_000
    max_map_len: int = 10_000
    max_depth: int = 32


DEFAULT_LIMITS = DecodeLimits()


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("bad_msgpack", f"msgpack ext type {code} is not allowed")


def _check_shape(value: Any, max_depth: int) -> None:
    """Nesting within `max_depth`, and no timestamps: msgpack decodes ext type -1 itself,
    without calling `ext_hook`, so it is refused here like every other ext type. Only
    containers are visited: a batch of records is mostly scalars."""
    if type(value) is msgpack.Timestamp:
        raise ProtocolError("bad_msgpack", "msgpack ext type -1 (timestamp) is not allowed")
    if type(value) not in (dict, list):
        return
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if type(item) is dict else item
        if depth + 1 > max_depth and children:
            raise ProtocolError("too_deep", f"message nesting exceeds the limit of {max_depth}")
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                stack.append((child, depth + 1))
            elif kind is msgpack.Timestamp:
                raise ProtocolError("bad_msgpack", "msgpack ext type -1 (timestamp) is not allowed")


def _plain_for(obj: Any, version: int) -> Any:
    """`to_plain`, leaving out the fields a peer speaking `version` does not know."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        since = FIELDS_SINCE.get(type(obj).__name__, {})
        return {
            f.name: _plain_for(getattr(obj, f.name), version)
            for f in dataclasses.fields(obj)
            if since.get(f.name, 1) <= version
        }
    if isinstance(obj, list | tuple):
        return [_plain_for(v, version) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain_for(v, version) for k, v in obj.items()}
    return to_plain(obj)


def encode(message: Any, version: int = PROTOCOL_VERSION) -> bytes:
    """Encode a message dataclass in the versioned envelope (for a peer of `version`);
    ProtocolError `unencodable` if a value in it has no msgpack form (protocol/wire.py
    checks user data before it gets this far)."""
    name = type(message).__name__
    if MESSAGE_TYPES.get(name) is not type(message):
        raise TypeError(f"{name} is not a protocol message")
    body = to_plain(message) if version == PROTOCOL_VERSION else _plain_for(message, version)
    try:
        return msgpack.packb({"v": version, "type": name, "body": body}, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        raise ProtocolError("unencodable", f"{name} cannot be encoded: {exc}") from None


def decode_any(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Any:
    """Decode an envelope into whichever message type it names."""
    return decode_versioned(data, limits)[0]


def _open_envelope(data: bytes, limits: DecodeLimits) -> tuple[type, Any, int]:
    """The message class an envelope names, its body still plain, and the version."""
    if len(data) > limits.max_body_bytes:
        raise ProtocolError(
            "too_large", f"message of {len(data)} bytes exceeds {limits.max_body_bytes} bytes"
        )
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.StackError) as exc:
        raise ProtocolError("bad_msgpack", f"body is not valid msgpack: {exc}") from None
    except Exception as exc:  # msgpack raises assorted errors on garbage input
        raise ProtocolError("bad_msgpack", f"body is not valid msgpack: {exc!r}") from None
    if not isinstance(raw, dict) or not {"v", "type", "body"} <= raw.keys():
        raise ProtocolError("bad_envelope", "message must be a map with keys v, type and body")
    version = raw["v"]
    if type(version) is not int or version not in SUPPORTED_PROTOCOL_VERSIONS:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {version!r} is not supported; this side speaks version "
            f"{PROTOCOL_VERSION} (and {SUPPORTED_PROTOCOL_VERSIONS[0]})",
        )
    cls = MESSAGE_TYPES.get(raw["type"]) if isinstance(raw["type"], str) else None
    if cls is None:
        raise ProtocolError("unknown_message", f"unknown message type {raw['type']!r}")
    return cls, raw["body"], version


def _typed(cls: type[T], body: Any, max_depth: int) -> T:
    _check_shape(body, max_depth)
    try:
        return from_plain(cls, body)
    except SchemaError as exc:
        raise ProtocolError("bad_message", f"{cls.__name__}.{exc}") from None


def decode_versioned(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[Any, int]:
    """The message and the protocol version its sender speaks."""
    cls, body, version = _open_envelope(data, limits)
    return _typed(cls, body, limits.max_depth), version


@dataclass(frozen=True)
class UnreadableLaunch:
    """A launch in a poll reply that did not decode: which run (if that much could be
    read), and why."""

    run_id: str | None
    lease: int | None
    problem: str


def decode_poll_reply(
    data: bytes, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[PollReply, list[UnreadableLaunch]]:
    """A PollReply, each launch decoded on its own: one that does not decode is left
    out and named (when its run id and lease can be read), so that one run's launch can
    never spoil the agent's other launches and stop orders."""
    cls, body, _ = _open_envelope(data, limits)
    if cls is not PollReply or not isinstance(body, dict):
        return _typed(PollReply, body, limits.max_depth), []
    launches = body.get("launches")
    if not isinstance(launches, list):
        return _typed(PollReply, body, limits.max_depth), []
    reply = _typed(PollReply, {**body, "launches": []}, limits.max_depth)
    decoded: list[LaunchRun] = []
    unreadable = []
    for item in launches:
        try:
            decoded.append(_typed(LaunchRun, item, limits.max_depth - 2))
        except ProtocolError as exc:
            fields = item if isinstance(item, dict) else {}
            run_id, lease = fields.get("run_id"), fields.get("lease")
            if isinstance(run_id, str) and type(lease) is int:
                unreadable.append(UnreadableLaunch(run_id[:64], lease, str(exc)))
            else:
                unreadable.append(UnreadableLaunch(None, None, str(exc)))
    return replace(reply, launches=decoded), unreadable


def decode(data: bytes, expected: type[T], limits: DecodeLimits = DEFAULT_LIMITS) -> T:
    """Decode an envelope that must hold a message of type `expected`."""
    message = decode_any(data, limits)
    if not isinstance(message, expected):
        raise ProtocolError(
            "unexpected_message",
            f"expected a {expected.__name__} message, got {type(message).__name__}",
        )
    return message


_FRAME_HEADER = struct.Struct(">I")


def frame(message: Any) -> bytes:
    """Encode a message as a length-prefixed frame, for the agent <-> worker pipes."""
    body = encode(message)
    return _FRAME_HEADER.pack(len(body)) + body


def frame_length(header: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> int:
    length: int = _FRAME_HEADER.unpack(header)[0]
    if length > limits.max_body_bytes:
        raise ProtocolError(
            "too_large", f"frame of {length} bytes exceeds {limits.max_body_bytes} bytes"
        )
    return length


FRAME_HEADER_SIZE = _FRAME_HEADER.size
