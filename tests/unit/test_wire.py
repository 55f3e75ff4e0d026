"""What may cross the wire (protocol/wire.py), checked against the codec itself: a
payload `payload_problem` accepts always decodes inside every message that carries one,
one it refuses never does, and `make_deliverable` always yields an acceptable one."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.worker.records import encode_record
from protocol.codec import DEFAULT_LIMITS, decode, decode_poll_reply, encode, frame_length
from protocol.messages import (
    EvaluationResult,
    EventBatch,
    LaunchRun,
    LocationSpec,
    PollReply,
    RequestedRun,
    RunRecord,
    WorkerSpec,
)
from protocol.wire import PAYLOAD_DEPTH, delivery_problem, make_deliverable, payload_problem


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def carriers(payload: dict[str, Any]) -> list[Any]:
    """Every message a user payload rides in, with the payload at its deepest place."""
    launch = LaunchRun("r", "j", "l", 1, config=payload)
    record = RunRecord(1, 1.0, "event", "LOG", data=payload)
    return [
        PollReply(launches=[launch]),
        WorkerSpec(launch=launch, location=LocationSpec("l")),
        EventBatch("a", "r", 1, [record]),
        record,
        EvaluationResult("e", runs=[RequestedRun("j", config=payload)]),
    ]


@pytest.mark.parametrize("levels", [1, 2, PAYLOAD_DEPTH - 1, PAYLOAD_DEPTH])
def test_a_payload_within_the_depth_reaches_every_receiver(levels: int) -> None:
    payload = nested(levels)
    assert payload_problem(payload, "config") is None
    for message in carriers(payload):
        assert delivery_problem(message) is None, type(message).__name__


def test_one_level_more_is_refused_with_its_path_and_would_not_decode() -> None:
    payload = nested(PAYLOAD_DEPTH + 1)
    problem = payload_problem(payload, "config")
    assert problem == f"config{'.a' * PAYLOAD_DEPTH} is nested deeper than {PAYLOAD_DEPTH} levels"
    assert delivery_problem(PollReply(launches=[LaunchRun("r", "j", "l", 1, config=payload)]))


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"s": "\ud800"}, "config.s is not valid Unicode text (a lone surrogate \\ud800"),
        ({"\udfff": 1}, "config has a key that is not valid Unicode text"),
        ({"n": 2**64}, "config.n is outside the signed 64-bit range"),
        ({"n": [1, -(2**63) - 1]}, "config.n[1] is outside the signed 64-bit range"),
        ({"f": math.inf}, "config.f is not a finite number"),
        ({"f": math.nan}, "config.f is not a finite number"),
        ({1: "x"}, "config has a key that is not a string (1)"),
        ({"o": object()}, "config.o is a object, which the protocol cannot carry"),
        ({"s": "x" * (DEFAULT_LIMITS.max_str_len + 1)}, "config.s is 1048577 bytes of UTF-8"),
        ({"l": [0] * (DEFAULT_LIMITS.max_array_len + 1)}, "config.l has 100001 items"),
    ],
)
def test_what_the_codec_cannot_carry_is_named(payload: dict[str, Any], expected: str) -> None:
    problem = payload_problem(payload, "config")
    assert problem is not None and problem.startswith(expected), problem


def test_a_hostile_payload_thousands_deep_is_walked_without_recursion() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    assert "nested deeper" in (payload_problem({"x": deep}, "config") or "")


hostile = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(alphabet=st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010)),
        st.binary(max_size=8),
        st.builds(object),
    ),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=3) | st.integers(), children, max_size=3)
        | st.tuples(children)
    ),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None)
@given(value=hostile, depth=st.integers(0, 40))
def test_make_deliverable_always_yields_what_travels(value: Any, depth: int) -> None:
    payload = make_deliverable({"v": nested(depth) | {"x": value}})
    assert payload_problem(payload, "data") is None
    for message in carriers(payload):
        assert delivery_problem(message) is None


def test_a_poll_reply_is_read_launch_by_launch() -> None:
    good = LaunchRun("good", "j", "l", 1, config={"k": 1})
    deep = LaunchRun("deep", "j", "l", 2, config=nested(40))
    typed = LaunchRun("typed", "j", "l", 3)
    body = encode(PollReply(launches=[deep, good, typed]))
    wrong = body.replace(b"\xa5typed", b"\xa5TYPED", 1)  # harmless: a run id
    reply, unreadable = decode_poll_reply(wrong)
    assert [launch.run_id for launch in reply.launches] == ["good", "TYPED"]
    assert [(u.run_id, u.lease) for u in unreadable] == [("deep", 2)]
    assert "nesting exceeds" in unreadable[0].problem
    with pytest.raises(Exception, match="nesting exceeds"):
        decode(body, PollReply)  # what an agent did before: the whole reply was lost


def test_a_record_user_code_fills_with_anything_still_travels() -> None:
    record = RunRecord(
        0,
        1.0,
        "event",
        "LOG",
        step="s",
        message="\ud800" + "x" * 2_000_000,
        data={"deep": nested(60), "big": 2**80, "obj": object()},
    )
    framed = encode_record(record)
    assert frame_length(framed[:4]) == len(framed) - 4
    sent = decode(framed[4:], RunRecord)
    assert payload_problem(sent.data, "data") is None
    assert sent.message.startswith("\ufffd") and sent.message.endswith("[truncated]")
    assert delivery_problem(EventBatch("a", "r", 1, [sent])) is None
    plain = RunRecord(0, 1.0, "event", "LOG", message="hi", data={"level": "INFO"})
    assert decode(encode_record(plain)[4:], RunRecord) == plain
