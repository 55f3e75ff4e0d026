"""Property tests of the msgpack decoder: whatever the bytes, the only failure is ProtocolError.

The control plane turns ProtocolError into a 4xx; any other exception out of the decoder
would be a 500 (or a crashed agent), and a slow decode would be a denial of service. So
every test here feeds the decoder hostile input and accepts only two outcomes: a message
of one of the protocol's types, or a ProtocolError with a stable code.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from typing import Any, Union

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS
from protocol.codec import ProtocolError, decode_any, decode_versioned, encode
from protocol.messages import MESSAGE_TYPES

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_DECODE_SECONDS = 2.0  # a decode slower than this on a few KiB is a denial of service

INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1  # msgpack carries all
ints = st.one_of(
    st.integers(-(2**31), 2**31),
    st.integers(INT64_MIN, UINT64_MAX),
    st.sampled_from([INT64_MIN, -1, 0, 2**31, 2**32, 2**63 - 1, 2**63, UINT64_MAX]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
plain = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.text(max_size=12), children, max_size=6),
    ),
    max_leaves=40,
)
plain_no_nan = st.recursive(
    st.one_of(scalars.filter(lambda v: v == v)),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
message_names = st.sampled_from(sorted(MESSAGE_TYPES))
type_names = st.one_of(message_names, st.text(max_size=20), plain)
versions = st.one_of(st.sampled_from(SUPPORTED_PROTOCOL_VERSIONS), plain)


def decode_or_protocol_error(data: bytes) -> Any:
    """Decode `data`; the result is a message or None (a ProtocolError with a code).

    Anything else escapes and fails the test; so does a decode that takes too long.
    """
    start = time.perf_counter()
    try:
        message, version = decode_versioned(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, str) and exc.code, exc
        return None
    finally:
        elapsed = time.perf_counter() - start
        assert elapsed < MAX_DECODE_SECONDS, f"decoding {len(data)} bytes took {elapsed:.2f} s"
    assert type(message) in MESSAGE_TYPES.values(), message
    assert version in SUPPORTED_PROTOCOL_VERSIONS
    return message


# --- valid messages of every type -----------------------------------------------------


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy of values fitting type hint `tp`, so valid messages can be generated
    (st.builds cannot: `dict[str, Any]` fields have no strategy). Integers stay within
    int64 and floats finite: the schema refuses anything else."""
    if tp is Any:
        return plain_no_nan
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return st.one_of(
            *(st.none() if a is type(None) else strategy_for(a) for a in typing.get_args(tp))
        )
    if origin is list:
        return st.lists(strategy_for(typing.get_args(tp)[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(
            st.text(max_size=10), strategy_for(typing.get_args(tp)[1]), max_size=3
        )
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(tp)}
        return st.fixed_dictionaries(fields).map(lambda kw: tp(**kw))
    simple: dict[Any, st.SearchStrategy[Any]] = {
        bool: st.booleans(),
        int: st.integers(INT64_MIN, INT64_MAX) | st.sampled_from([INT64_MIN, -1, 0, INT64_MAX]),
        float: st.floats(allow_nan=False, allow_infinity=False),
        str: st.text(max_size=30),
        bytes: st.binary(max_size=30),
    }
    return simple[tp]


def valid_message(name: str) -> st.SearchStrategy[Any]:
    return strategy_for(MESSAGE_TYPES[name])


any_valid_message = message_names.flatmap(valid_message)


@FUZZ
@given(message=any_valid_message, version=st.sampled_from(SUPPORTED_PROTOCOL_VERSIONS))
def test_generated_messages_round_trip(message: Any, version: int) -> None:
    """Sanity check of the generator: what it builds is valid and decodes back."""
    decoded, got_version = decode_versioned(encode(message, version))
    assert got_version == version and type(decoded) is type(message)
    if version == PROTOCOL_VERSION:
        assert decoded == message


# --- arbitrary input ------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes(data: bytes) -> None:
    decode_or_protocol_error(data)


@FUZZ
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_after_an_envelope_prefix(data: bytes) -> None:
    """Random bytes where the body goes, so they get past the envelope check sometimes."""
    prefix = b"\x83\xa1v\x02\xa4type\xa8EventAck\xa4body"
    decode_or_protocol_error(prefix + data)


@FUZZ
@given(value=plain)
def test_arbitrary_structures(value: Any) -> None:
    decode_or_protocol_error(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(
    v=versions,
    type_=type_names,
    body=plain,
    extra=st.dictionaries(st.text(max_size=5), plain, max_size=2),
)
def test_arbitrary_structures_in_an_envelope(v: Any, type_: Any, body: Any, extra: dict) -> None:
    envelope = {**extra, "v": v, "type": type_, "body": body}
    decode_or_protocol_error(msgpack.packb(envelope, use_bin_type=True))


@FUZZ
@given(st.data())
def test_valid_bodies_with_one_field_replaced(data: st.DataObject) -> None:
    """A valid message whose field holds a random value: the schema check must refuse it
    cleanly (or accept it, if the value happens to fit)."""
    name = data.draw(message_names)
    body = dataclasses.asdict(data.draw(valid_message(name)))
    field_names = [f.name for f in dataclasses.fields(MESSAGE_TYPES[name])]
    key = data.draw(st.sampled_from([*field_names, "unknown_field"]))
    if data.draw(st.booleans()):
        body[key] = data.draw(plain)
    else:
        body.pop(key, None)
    envelope = {"v": PROTOCOL_VERSION, "type": name, "body": body}
    decode_or_protocol_error(msgpack.packb(envelope, use_bin_type=True))


# --- mutated valid messages -----------------------------------------------------------


def mutate(data: bytes, draw: st.DataObject) -> bytes:
    """Flip, insert, delete or overwrite bytes, or truncate, a few times."""
    buf = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        op = draw.draw(st.sampled_from(["flip", "insert", "delete", "set", "truncate"]))
        # A position independent of the length, so the draws do not depend on the input
        # (the e2e fuzzing mutates messages naming server state, e.g. a growing lease).
        pos = draw.draw(st.integers(0, 1 << 16)) % max(len(buf), 1)
        if op == "insert":
            buf[pos:pos] = draw.draw(st.binary(min_size=1, max_size=8))
        elif not buf:
            continue
        elif op == "flip":
            buf[pos] ^= 1 << draw.draw(st.integers(0, 7))
        elif op == "delete":
            del buf[pos : pos + draw.draw(st.integers(1, 8))]
        elif op == "set":
            buf[pos] = draw.draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xD4, 0xDD, 0xDF, 0xFF]))
        else:
            del buf[pos:]
    return bytes(buf)


@settings(FUZZ, max_examples=600)
@given(message=any_valid_message, data=st.data())
def test_mutated_valid_messages(message: Any, data: st.DataObject) -> None:
    decode_or_protocol_error(mutate(encode(message), data))


@pytest.mark.parametrize("name", sorted(MESSAGE_TYPES))
def test_every_truncation_of_every_message_type(name: str) -> None:
    """Each prefix of a valid message (a cut-off request body) is refused cleanly."""
    data = encode(_fixed_sample(name))
    for end in range(len(data)):
        assert decode_or_protocol_error(data[:end]) is None


def _fixed_sample(name: str) -> Any:
    """A deterministic instance of message `name` with every list and map non-empty."""

    def build(tp: Any) -> Any:
        origin = typing.get_origin(tp)
        if tp is Any:
            return {"k": [1, "x", None]}
        if origin in (Union, types.UnionType):
            return build(next(a for a in typing.get_args(tp) if a is not type(None)))
        if origin is list:
            return [build(typing.get_args(tp)[0])]
        if origin is dict:
            return {"key": build(typing.get_args(tp)[1])}
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            return tp(**{f.name: build(hints[f.name]) for f in dataclasses.fields(tp)})
        return {bool: True, int: 7, float: 1.5, str: "s", bytes: b"b"}[tp]

    return build(MESSAGE_TYPES[name])


# --- concrete adversarial inputs ------------------------------------------------------


def in_envelope(body: bytes, type_: str = "EventBatch") -> bytes:
    """A valid envelope header followed by hand-made body bytes."""
    header = b"\x83\xa1v" + msgpack.packb(PROTOCOL_VERSION) + b"\xa4type" + msgpack.packb(type_)
    return header + b"\xa4body" + body


def array32(count: int, item: bytes) -> bytes:
    return b"\xdd" + count.to_bytes(4, "big") + item * count


VALID = encode(_fixed_sample("EventAck"))
ADVERSARIAL = {
    "never_used_byte": b"\xc1",
    "truncated_array": b"\x92\x01",
    "trailing_bytes": VALID + b"\x00",
    "trailing_garbage": VALID + b"\xc1\xc1",
    "empty_body": b"",
    "empty_map": b"\x80",
    "nil": b"\xc0",
    "nested_100": in_envelope(b"\x91" * 100 + b"\xc0"),
    "nested_1000": in_envelope(b"\x91" * 1000 + b"\xc0"),
    "nested_100000": in_envelope(b"\x91" * 100_000 + b"\xc0"),
    "nested_maps_1000": in_envelope(b"\x81\xa1k" * 1000 + b"\xc0"),
    "nested_100000_unterminated": in_envelope(b"\x91" * 100_000),
    "ext_type": b"\xd4\x05\x01",
    "ext_type_in_body": in_envelope(b"\xd4\x05\x01"),
    "invalid_utf8": b"\xa2\xff\xfe",
    "invalid_utf8_in_body": in_envelope(b"\x81\xa2\xff\xfe\x01"),
    "int_map_keys": b"\x81\x01\x02",
    "int_map_keys_in_body": in_envelope(b"\x81\x01\x02"),
    "array_as_map_key": b"\x81\x91\x01\x02",
    "map_as_map_key_in_body": in_envelope(b"\x81\x80\x02"),
    "array32_claiming_4G_items": b"\xdd\xff\xff\xff\xff",
    "array32_claiming_4G_items_in_body": in_envelope(b"\xdd\xff\xff\xff\xff"),
    "map32_claiming_4G_pairs": in_envelope(b"\xdf\xff\xff\xff\xff"),
    "str32_claiming_4G_bytes": in_envelope(b"\xdb\xff\xff\xff\xff"),
    "bin32_claiming_4G_bytes": in_envelope(b"\xc6\xff\xff\xff\xff"),
    "one_million_empty_maps": array32(1_000_000, b"\x80"),
    "one_million_empty_maps_in_body": in_envelope(array32(1_000_000, b"\x80")),
    "100k_empty_maps_in_body": in_envelope(array32(100_000, b"\x80")),
    "envelope_is_a_list": msgpack.packb([2, "EventAck", {"acked_seq": 1}]),
    "envelope_with_bytes_keys": msgpack.packb({b"v": 2, b"type": b"EventAck", b"body": {}}),
    "version_is_a_map": msgpack.packb({"v": {}, "type": "EventAck", "body": {"acked_seq": 1}}),
    "version_is_true": msgpack.packb({"v": True, "type": "EventAck", "body": {"acked_seq": 1}}),
    "type_is_a_list": msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": ["EventAck"], "body": {"acked_seq": 1}}
    ),
    "body_is_a_list": msgpack.packb({"v": PROTOCOL_VERSION, "type": "EventAck", "body": [1]}),
    "body_key_is_bytes": msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": "EventAck", "body": {b"acked_seq": 1}}
    ),
    "seq_is_a_float": msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": "EventAck", "body": {"acked_seq": 1.0}}
    ),
    "too_large": b"\xc4\x00" + b"\x00" * (8 * 1024 * 1024),
}


@pytest.mark.parametrize("data", ADVERSARIAL.values(), ids=ADVERSARIAL.keys())
def test_adversarial_input_is_a_protocol_error(data: bytes) -> None:
    start = time.perf_counter()
    with pytest.raises(ProtocolError) as info:
        decode_any(data)
    elapsed = time.perf_counter() - start
    assert isinstance(info.value.code, str) and info.value.code
    assert elapsed < 1.0, f"took {elapsed:.2f} s"


def test_adversarial_codes_are_specific() -> None:
    """The codes name the problem, so an agent's log says what was wrong."""
    assert _code(ADVERSARIAL["ext_type"]) == "bad_msgpack"
    assert _code(ADVERSARIAL["nested_1000"]) == "too_deep"
    assert _code(ADVERSARIAL["envelope_is_a_list"]) == "bad_envelope"
    assert _code(ADVERSARIAL["version_is_true"]) == "unsupported_version"
    assert _code(ADVERSARIAL["type_is_a_list"]) == "unknown_message"
    assert _code(ADVERSARIAL["seq_is_a_float"]) == "bad_message"
    assert _code(ADVERSARIAL["too_large"]) == "too_large"


def _code(data: bytes) -> str:
    with pytest.raises(ProtocolError) as info:
        decode_any(data)
    return info.value.code


def test_timestamp_ext_is_refused_like_every_other_ext_type() -> None:
    """msgpack decodes ext type -1 itself (into msgpack.Timestamp) without calling the
    ext_hook, so it slips into `dict[str, Any]` fields (RunRecord.data, LaunchRun.config,
    RequestedRun.config) although the codec promises that ext types are refused."""
    record = {
        "seq": 1,
        "time": 0.0,
        "kind": "event",
        "type": "LOG",
        "data": {"t": msgpack.Timestamp(0)},
    }
    body = {"agent_id": "a", "run_id": "r", "lease": 1, "records": [record]}
    data = msgpack.packb({"v": PROTOCOL_VERSION, "type": "EventBatch", "body": body})
    assert b"\xd6\xff" in data  # fixext 4, type -1
    with pytest.raises(ProtocolError) as info:
        decode_any(data)
    assert info.value.code == "bad_msgpack"
