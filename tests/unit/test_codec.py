"""The protocol codec: every message round-trips; bad input raises one clear error."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from protocol import PROTOCOL_VERSION
from protocol.codec import (
    DecodeLimits,
    ProtocolError,
    decode,
    decode_any,
    decode_versioned,
    encode,
    frame,
)
from protocol.messages import (
    MESSAGE_TYPES,
    CodeLocationInfo,
    DescribeLocation,
    Drain,
    Drained,
    ErrorReply,
    Evaluate,
    EvaluateSpec,
    EvaluationAck,
    EvaluationResult,
    EventAck,
    EventBatch,
    Heartbeat,
    HeartbeatReply,
    JobInfo,
    LaunchRun,
    LocationSpec,
    LocationsUpdated,
    OpInfo,
    Poll,
    PollReply,
    Register,
    Registered,
    ReloadLocations,
    RequestedRun,
    RunRecord,
    RunState,
    ScheduleInfo,
    SensorInfo,
    SlotGrant,
    StepResult,
    StopRun,
    UpdateLocations,
    WorkerSpec,
)

LAUNCH = LaunchRun(
    run_id="r1", job="etl", location="loc", lease=7, tags={"a": "b"}, config={"x": [1, 2.5, None]}
)
RECORD = RunRecord(
    seq=3, time=1.5, kind="event", type="LOG", step="s", message="hi", data={"level": "INFO"}
)
LOCATION = CodeLocationInfo(
    name="loc",
    jobs=[JobInfo(name="etl", ops=[OpInfo(name="a", upstream=["b"], tags={"t": "v"}, pool="db")])],
    schedules=[ScheduleInfo(name="daily", job="etl", cron="0 6 * * *", timezone="Europe/Berlin")],
    sensors=[SensorInfo(name="files", job="etl", minimum_interval_seconds=5.0)],
)
SAMPLES = [
    Register(
        name="w1",
        hostname="h",
        version="0.1",
        queues=["default"],
        max_concurrent_runs=4,
        code_locations=[LOCATION, CodeLocationInfo(name="bad", error="ImportError: x")],
        labels={"gpu": "a100"},
        resources={"cpus": 8},
    ),
    Registered(agent_id="a1", heartbeat_interval_seconds=5.0, poll_timeout_seconds=25.0),
    Poll(agent_id="a1", held_leases=[1, 2], stopping_leases=[2], held_grants=[4]),
    PollReply(
        launches=[LAUNCH],
        stops=[StopRun("r2", 2, True, "run canceled", 10.0)],
        grants=[SlotGrant("r1", 7, 4, "a", 0, "db")],
    ),
    Drain(agent_id="a1"),
    Drained(status="DRAINING"),
    Evaluate(eval_id="e1", location="loc", kind="schedule", name="daily", scheduled_time=1.5),
    EvaluateSpec(
        evaluate=Evaluate(eval_id="e2", location="loc", kind="sensor", name="s", cursor="c"),
        location=LocationSpec(name="loc", module="m"),
    ),
    EvaluationResult(
        eval_id="e1",
        agent_id="a1",
        runs=[RequestedRun(job="etl", run_key="k", tags={"a": "b"}, config={"n": 1})],
        cursor="c2",
    ),
    EvaluationAck(ok=True),
    Heartbeat(agent_id="a1", runs=[RunState(run_id="r1", lease=7, state="running")]),
    HeartbeatReply(ok=True),
    EventBatch(agent_id="a1", run_id="r1", lease=7, records=[RECORD]),
    EventAck(acked_seq=3),
    ErrorReply(code="stale_lease", message="no"),
    RECORD,
    WorkerSpec(launch=LAUNCH, location=LocationSpec(name="loc", python_file="/x/defs.py")),
    DescribeLocation(location=LocationSpec(name="loc", module="pkg.defs")),
    LOCATION,
    UpdateLocations(
        agent_id="a1",
        code_locations=[
            dataclasses.replace(LOCATION, version="abc1", versions=["abc1", "abc0"]),
            CodeLocationInfo(name="other", version="c0ffee", reload_error="SyntaxError"),
        ],
    ),
    LocationsUpdated(ok=True),
]


def test_samples_cover_every_message_type() -> None:
    assert {type(m).__name__ for m in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    data = encode(message)
    assert decode(data, type(message)) == message
    assert decode_any(data) == message


def test_envelope_carries_version() -> None:
    raw = msgpack.unpackb(encode(EventAck(acked_seq=1)))
    assert raw == {"v": PROTOCOL_VERSION, "type": "EventAck", "body": {"acked_seq": 1}}


def _envelope(body: object, type_: str = "EventAck", v: object = PROTOCOL_VERSION) -> bytes:
    return msgpack.packb({"v": v, "type": type_, "body": body})


@pytest.mark.parametrize("version", [0, 99, PROTOCOL_VERSION - 2, "2", True])
def test_version_mismatch_names_both_versions(version: object) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(_envelope({"acked_seq": 1}, v=version), EventAck)
    assert info.value.code == "unsupported_version"
    assert repr(version) in str(info.value) and str(PROTOCOL_VERSION) in str(info.value)


def test_the_previous_version_is_spoken_both_ways() -> None:
    """A version-4 agent's poll decodes (no step results held); what is sent to it
    leaves out the fields of version 5 (step results, a launch's step), and what it
    was already told (slot grants, code versions) stays."""
    old_poll = {"agent_id": "a", "held_leases": [1], "held_grants": [7]}
    message, version = decode_versioned(_envelope(old_poll, "Poll", PROTOCOL_VERSION - 1))
    assert version == PROTOCOL_VERSION - 1
    assert message.held_results == [] and message.held_grants == [7]
    grant = SlotGrant("r", 1, 7, "a", 0, "warehouse")
    launch = dataclasses.replace(
        LAUNCH, claim_pool_slots=True, code_version="abc", step="a", step_attempt=2
    )
    result = StepResult("r", 1, 9, "a", 0, "agent-2", {"ok": True})
    reply = PollReply(
        launches=[launch],
        stops=[StopRun("r", 1, True, "x")],
        grants=[grant],
        reload=ReloadLocations(["loc"]),
        step_results=[result],
    )
    raw = msgpack.unpackb(encode(reply, PROTOCOL_VERSION - 1))
    assert raw["v"] == PROTOCOL_VERSION - 1
    assert set(raw["body"]) == {"launches", "stops", "evaluations", "grants", "reload"}
    assert "step" not in raw["body"]["launches"][0]
    assert "step_attempt" not in raw["body"]["launches"][0]
    assert raw["body"]["launches"][0]["code_version"] == "abc"
    current = msgpack.unpackb(encode(reply))["body"]
    assert current["step_results"][0]["task_id"] == 9
    assert current["launches"][0]["step"] == "a"
    assert current["launches"][0]["step_attempt"] == 2


def test_version_2_is_no_longer_spoken() -> None:
    """Only the previous version is kept: a version-2 agent is told both versions."""
    with pytest.raises(ProtocolError) as info:
        decode(_envelope({"acked_seq": 1}, v=2), EventAck)
    assert info.value.code == "unsupported_version"


def test_version_1_is_no_longer_spoken() -> None:
    """Only the previous version is kept: a version-1 agent is told both versions."""
    with pytest.raises(ProtocolError) as info:
        decode(_envelope({"acked_seq": 1}, v=1), EventAck)
    assert info.value.code == "unsupported_version"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xc1", "bad_msgpack"),
        (b"", "bad_msgpack"),
        (msgpack.packb([1, 2]), "bad_envelope"),
        (_envelope({}, type_="Nope"), "unknown_message"),
        (_envelope({"acked_seq": "3"}), "bad_message"),
        (_envelope({"acked_seq": True}), "bad_message"),
        (_envelope({}), "bad_message"),
        (_envelope({"acked_seq": 1, "extra": 2}), "bad_message"),
        (_envelope({"agent_id": "a", "held_leases": ["x"]}, "Poll"), "bad_message"),
        (
            msgpack.packb({"v": 1, "type": "EventAck", "body": msgpack.ExtType(5, b"x")}),
            "bad_msgpack",
        ),
        (_envelope({"acked_seq": 1}) + b"\x00", "bad_msgpack"),
    ],
)
def test_bad_input_is_a_protocol_error(data: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(data, EventAck if b"Poll" not in data else Poll)
    assert info.value.code == code


def test_wrong_message_type_is_refused() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(encode(EventAck(acked_seq=1)), Poll)
    assert info.value.code == "unexpected_message"


def test_error_names_the_field() -> None:
    register = SAMPLES[0]
    assert isinstance(register, Register)
    bad = dataclasses.asdict(register)
    bad["code_locations"][0]["jobs"][0]["ops"][0]["upstream"] = [5]
    with pytest.raises(ProtocolError, match=r"code_locations\[0\]\.jobs\[0\]\.ops\[0\]"):
        decode(_envelope(bad, "Register"), Register)


@pytest.mark.parametrize(
    ("limits", "body"),
    [
        (DecodeLimits(max_body_bytes=100), {"agent_id": "a" * 200, "held_leases": []}),
        (DecodeLimits(max_str_len=10), {"agent_id": "a" * 11, "held_leases": []}),
        (DecodeLimits(max_array_len=5), {"agent_id": "a", "held_leases": list(range(6))}),
        (DecodeLimits(max_map_len=2), {"agent_id": "a", "held_leases": [], "x": 1}),
    ],
)
def test_bounds(limits: DecodeLimits, body: dict) -> None:
    with pytest.raises(ProtocolError):
        decode(_envelope(body, "Poll"), Poll, limits)


def test_depth_is_bounded() -> None:
    nested: object = 1
    for _ in range(40):
        nested = {"k": nested}
    batch = {
        "agent_id": "a",
        "run_id": "r",
        "lease": 1,
        "records": [{"seq": 1, "time": 0.0, "kind": "event", "type": "LOG", "data": nested}],
    }
    with pytest.raises(ProtocolError) as info:
        decode(_envelope(batch, "EventBatch"), EventBatch)
    assert info.value.code == "too_deep"


def test_frame_is_length_prefixed() -> None:
    data = frame(RECORD)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert decode(data[4:], RunRecord) == RECORD
