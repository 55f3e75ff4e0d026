"""Fuzzing the agent API of a real control plane: hostile bodies get a 4xx, never a 5xx.

The /agent/v1 endpoints are the control plane's exposed surface: anything that can reach
the port can send them bytes. Each endpoint gets random bytes, random msgpack in and out
of the envelope, valid messages of the wrong type, and valid messages with fields swapped
for hostile values (wrong types, huge and negative ints, long strings). The messages name
a real registered agent, run and lease where they can, so the fuzzing reaches storage
rather than stopping at "unknown agent". Every reply must come within the timeout with a
status below 500, and the server must still be up and serving at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from protocol import PROTOCOL_VERSION
from protocol.codec import ProtocolError, decode_any, encode
from protocol.messages import (
    MESSAGE_TYPES,
    CodeLocationInfo,
    Drain,
    ErrorReply,
    EvaluationResult,
    EventBatch,
    Heartbeat,
    JobInfo,
    OpInfo,
    Poll,
    PollReply,
    Register,
    Registered,
    RequestedRun,
    RunRecord,
    RunState,
)
from protocol.schema import to_plain
from tests.conftest import FLEETRUN, ControlPlaneProc, http, start_process, wait_for
from tests.unit.test_fuzz_codec import mutate, plain, strategy_for

pytestmark = pytest.mark.e2e

TIMEOUT = 10.0  # a reply slower than this is a hang
# Shrinking replays examples against a live server, each with several requests: it can
# take minutes. It is off unless FLEETRUN_FUZZ_SHRINK=1; KNOWN_HOSTILE below holds the
# minimal cases found so far.
PHASES = list(Phase) if os.environ.get("FLEETRUN_FUZZ_SHRINK") else [Phase.generate]
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,  # the server's state changes between runs: replaying is meaningless
    phases=PHASES,
    suppress_health_check=list(HealthCheck),
)
CONFIG = """\
[server]
port = 0
poll_timeout_seconds = 0.05

[storage]
url = "sqlite:///fleetrun.db"

[run_coordinator]
max_concurrent_runs = -1
"""
AGENT_NAME, LOCATION, JOB = "fuzz_agent", "fuzzloc", "fuzzjob"


class Client:
    """One keep-alive HTTP connection; reconnects when the server closes it."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.conn: HTTPConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "application/msgpack",
        extra_headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": content_type, **(extra_headers or {})}
        for attempt in range(3):
            if self.conn is None:
                self.conn = HTTPConnection(self.host, self.port, timeout=TIMEOUT)
            start = time.monotonic()
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
            except TimeoutError:
                self.close()
                raise AssertionError(
                    f"{method} {path}: no reply within {TIMEOUT} s to {body[:200]!r}"
                ) from None
            except (OSError, HTTPException):
                # The server may close a kept-alive connection (idle timeout, or after
                # refusing a body it did not read); a fresh one must then work.
                self.close()
                if attempt == 2:
                    raise
                continue
            assert time.monotonic() - start < TIMEOUT
            if resp.will_close:
                self.close()
            return resp.status, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Fleet:
    """The control plane and the real ids the fuzzed messages name."""

    cp: ControlPlaneProc
    client: Client
    agent_id: str = ""
    run_id: str = ""
    lease: int = 0

    def send(self, path: str, body: bytes, method: str = "POST") -> tuple[int, bytes]:
        """Send and check the status; a 5xx is recorded with the server's log tail."""
        status, data = self.client.request(method, path, body)
        if status >= 500:
            tail = self.cp.log()[-3000:]
            raise AssertionError(
                f"{method} {path} -> {status} {data[:300]!r}\nbody (hex): {body.hex()}\n"
                f"server log tail:\n{tail}"
            )
        return status, data

    def call(self, path: str, message: Any) -> Any:
        status, data = self.send(path, encode(message))
        assert status == 200, (path, status, data)
        return decode_any(data)

    def check_views(self) -> None:
        """The REST views showing what agents sent still answer: a stored value (a time, a
        cron string, a number) that breaks them is a bug even if storing it did not."""
        for path in (
            f"/api/v1/runs/{self.run_id}",
            f"/api/v1/runs/{self.run_id}/events",
            f"/api/v1/runs/{self.run_id}/logs",
            "/api/v1/agents",
            "/api/v1/jobs",
            "/api/v1/schedules",
            "/api/v1/sensors",
            "/api/v1/queue",
        ):
            status, data = self.client.request("GET", path, content_type="application/json")
            assert status < 500, f"GET {path} -> {status} {data[:300]!r}\n{self.cp.log()[-3000:]}"

    def cancel(self) -> None:
        """Cancel the fuzz run: CANCELING, a state where events take other paths."""
        status, body = http("POST", f"{self.cp.url}/api/v1/runs/{self.run_id}/cancel", {})
        assert status == 200, (status, body)

    def forget(self, body: bytes) -> None:
        """Undo an accepted Register: re-register that name with no locations or queues,
        so the next example starts clean (and it never takes the fuzz runs)."""
        message = decode_any(body)
        if isinstance(message, Register) and message.name != AGENT_NAME:
            clean = Register(message.name, "h", "0", queues=[], max_concurrent_runs=1)
            self.call("/agent/v1/register", clean)

    def register(self) -> None:
        """(Re-)register the fuzz agent: ONLINE again even if a fuzzed Drain drained it."""
        job = JobInfo(name=JOB, ops=[OpInfo(name="a")])
        reply = self.call(
            "/agent/v1/register",
            Register(
                name=AGENT_NAME,
                hostname="fuzz",
                version="0.1.0",
                queues=["default"],
                max_concurrent_runs=1000,
                code_locations=[CodeLocationInfo(LOCATION, [job])],
                runs=[RunState(self.run_id, self.lease, "running")] if self.run_id else [],
            ),
        )
        assert isinstance(reply, Registered)
        self.agent_id = reply.agent_id

    def new_run(self) -> None:
        """A fresh run leased to the fuzz agent (launch acked), so events reach storage."""
        self.register()
        status, body = http("POST", self.cp.url + "/api/v1/runs", {"job": JOB})
        assert status == 201, (status, body)
        run_id = body["run_id"]

        def launched() -> int | None:
            reply = self.call("/agent/v1/poll", Poll(agent_id=self.agent_id))
            assert isinstance(reply, PollReply)
            return next((ln.lease for ln in reply.launches if ln.run_id == run_id), None)

        self.run_id, self.lease = run_id, wait_for(launched, 30, what="the fuzz run's launch")
        self.call("/agent/v1/poll", Poll(agent_id=self.agent_id, held_leases=[self.lease]))


def start_fuzz_control_plane(folder: Path) -> ControlPlaneProc:
    """Like conftest's start_control_plane, with short long-polls and no run limit (the
    helper's `extra_config` cannot add keys to its [server] table)."""
    config = folder / "control-plane.toml"
    config.write_text(CONFIG)
    proc = start_process(
        [*FLEETRUN, "serve", "--config", str(config)], folder / "control-plane.log"
    )

    def listening() -> re.Match[str] | None:
        assert proc.popen.poll() is None, f"control plane exited early:\n{proc.log()}"
        return re.search(r"control plane listening on (https?://\S+)", proc.log())

    match = wait_for(listening, what="control plane to listen")
    return ControlPlaneProc(proc.popen, proc.log_path, url=match.group(1))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cp = start_fuzz_control_plane(tmp_path_factory.mktemp("fuzz_cp"))
    fleet = Fleet(cp, Client(cp.url))
    try:
        fleet.new_run()
        yield fleet
    finally:
        fleet.client.close()
        cp.stop()


# --- hostile values and messages ------------------------------------------------------

long_strings = st.builds(
    lambda c, n: c * n, st.sampled_from(["x", "é", "\x00", "/", "🙂"]), st.integers(1_000, 200_000)
)
EVENT_TYPES = [
    "RUN_START",
    "STEP_START",
    "STEP_SUCCESS",
    "STEP_FAILURE",
    "LOG",
    "RUN_SUCCESS",
    "RUN_FAILURE",
    "RUN_CANCELED",
    "RUN_ENQUEUED",
    "RUN_STARTING",
    "RUN_RETRY",
    "RUN_WORKER_RESTARTED",
    "RUN_CANCELING",
    "ENGINE_EVENT",
    "BOGUS_TYPE",
]
hostile_value = st.one_of(
    plain,
    st.sampled_from([*EVENT_TYPES, "worker_crash", "agent_lost", "log", "stdout"]),
    st.sampled_from([2**63, 2**64 - 1, -(2**63), 2**63 - 1, -1, 0, 2**31, -(2**31) - 1]),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 2.0**63, -0.0]),
    long_strings,
    st.lists(st.integers(-(2**63), 2**64 - 1), max_size=5),
    st.dictionaries(st.text(max_size=8), st.integers(-(2**63), 2**64 - 1), max_size=3),
)


def base_message(name: str, fleet: Fleet) -> Any:
    """A valid message of type `name`, naming the fleet's real agent, run and lease."""
    seq = 1  # each example that stores events gets a fresh run
    records = [
        RunRecord(seq, time.time(), "event", "RUN_START"),
        RunRecord(seq + 1, time.time(), "log", "stdout", step="a", message="hi\n"),
        RunRecord(seq + 2, time.time(), "event", "STEP_SUCCESS", step="a", data={"k": [1]}),
        RunRecord(
            seq + 3,
            time.time(),
            "event",
            "RUN_FAILURE",
            message="x",
            data={"failure_kind": "worker_crash"},
        ),
    ]
    samples = {
        "Register": Register(
            name="fuzz_mutant",
            hostname="h",
            version="0.1.0",
            queues=["default", "other"],
            max_concurrent_runs=2,
            runs=[RunState(fleet.run_id, fleet.lease, "running")],
            code_locations=[CodeLocationInfo("mutloc", [JobInfo("j", [OpInfo("o", ["p"])])])],
            capabilities=["reuse_outputs"],
        ),
        "Poll": Poll(fleet.agent_id, held_leases=[fleet.lease], stopping_leases=[fleet.lease]),
        "Heartbeat": Heartbeat(fleet.agent_id, [RunState(fleet.run_id, fleet.lease, "running")]),
        "EventBatch": EventBatch(fleet.agent_id, fleet.run_id, fleet.lease, records),
        "Drain": Drain(fleet.agent_id),
        "EvaluationResult": EvaluationResult(
            "eval-1", fleet.agent_id, [RequestedRun(JOB, "key", {"t": "v"}, {"c": 1})]
        ),
    }
    return samples[name]


def slots(value: Any, path: tuple = ()) -> Iterator[tuple]:
    """Every place in a plain structure whose value can be replaced, as a key path."""
    if path:
        yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from slots(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from slots(item, (*path, index))


def replace_fields(body: dict, data: st.DataObject) -> dict:
    """Replace 1-3 values anywhere in `body` with hostile ones (or drop/add a key)."""
    body = copy.deepcopy(body)
    for _ in range(data.draw(st.integers(1, 3), label="replacements")):
        places = list(slots(body))
        if not places:
            break
        path = places[data.draw(st.integers(0, 1 << 16), label="path") % len(places)]
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace"] * 6 + ["drop", "add"]), label="action")
        if action == "replace":
            parent[path[-1]] = data.draw(hostile_value, label="value")
        elif action == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=10), label="new key")] = data.draw(plain)
    return body


def envelope(name: Any, body: Any, v: Any = PROTOCOL_VERSION) -> bytes:
    return msgpack.packb({"v": v, "type": name, "body": body}, use_bin_type=True)


def request_body(expected: str, fleet: Fleet, data: st.DataObject) -> bytes:
    """One hostile request body for the endpoint that expects message type `expected`."""
    kind = data.draw(
        st.sampled_from(
            [
                "bytes",
                "structure",
                "envelope",
                "wrong_type",
                "generated",
                "mutated_bytes",
                "replaced",
                "replaced",
                "replaced",
                "replaced",
            ]
        ),
        label="kind",
    )
    if kind == "bytes":
        return data.draw(st.binary(max_size=2048))
    if kind == "structure":
        return msgpack.packb(data.draw(plain), use_bin_type=True)
    if kind == "envelope":
        name = data.draw(st.sampled_from([expected, *MESSAGE_TYPES]) | plain)
        v = data.draw(st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION - 1]) | plain)
        return envelope(name, data.draw(plain), v)
    if kind == "wrong_type":
        other = data.draw(st.sampled_from(sorted(set(MESSAGE_TYPES) - {expected})))
        return encode(data.draw(strategy_for(MESSAGE_TYPES[other])))
    if kind == "generated":  # valid but random, often naming the real agent
        message = data.draw(strategy_for(MESSAGE_TYPES[expected]))
        if hasattr(message, "agent_id") and data.draw(st.booleans()):
            message = dataclasses.replace(message, agent_id=fleet.agent_id)
        return encode(message)
    base = base_message(expected, fleet)
    if kind == "mutated_bytes":
        return mutate(encode(base), data)
    version = data.draw(st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION - 1]))
    return envelope(expected, replace_fields(to_plain(base), data), version)


ENDPOINTS = {
    "register": "Register",
    "poll": "Poll",
    "heartbeat": "Heartbeat",
    "events": "EventBatch",
    "drain": "Drain",
    "evaluation": "EvaluationResult",
}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_fuzz_agent_endpoint(fleet: Fleet, endpoint: str) -> None:
    expected = ENDPOINTS[endpoint]
    count = 0

    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        nonlocal count
        count += 1
        if count % 10 == 0:  # runs end and agents get drained: keep the targets live
            fleet.new_run()
        if endpoint == "events" and data.draw(st.booleans(), label="cancel the run first"):
            fleet.cancel()
        body = request_body(expected, fleet, data)
        status, reply = fleet.send(f"/agent/v1/{endpoint}", body)
        if status != 200:
            assert_error_reply(reply)
            if endpoint == "events" and b"record_refused" in reply:  # the run ended
                fleet.new_run()
            return
        try:
            fleet.check_views()  # what was stored must still be servable
        finally:
            fleet.forget(body)
            if endpoint == "events":  # a batch may end the run: start each example afresh
                fleet.new_run()

    fuzz()
    fleet.new_run()


def assert_error_reply(reply: bytes) -> None:
    """A refusal names its problem: an ErrorReply, or a JSON error from the HTTP layer."""
    try:
        decoded = decode_any(reply)
    except ProtocolError:
        assert json.loads(reply)["error"], reply
        return
    assert isinstance(decoded, ErrorReply) and decoded.code, decoded


def path_segment() -> st.SearchStrategy[str]:
    return st.text(min_size=1, max_size=60) | long_strings.map(lambda s: s[:3000])


@FUZZ
@given(data=st.data())
def test_fuzz_outputs(fleet: Fleet, data: st.DataObject) -> None:
    """PUT and GET /agent/v1/outputs/{run_id}/{step} with random paths, query and bodies."""

    def pick(real: str, label: str) -> str:
        hostile = st.text(max_size=40) | st.integers(-(2**70), 2**70).map(str)
        return data.draw(st.just(real) | hostile | path_segment(), label=label)

    run_id = pick(fleet.run_id, "run_id")
    step = pick("a", "step")
    query = {
        "lease": pick(str(fleet.lease), "lease"),
        "agent_id": pick(fleet.agent_id, "agent_id"),
        "run_id": pick(fleet.run_id, "query run_id"),
    }
    for key in data.draw(st.lists(st.sampled_from(sorted(query)), unique=True), label="omit"):
        del query[key]
    path = "/agent/v1/outputs/{}/{}?{}".format(
        urllib.parse.quote(run_id, safe=""),
        urllib.parse.quote(step, safe=""),
        urllib.parse.urlencode(query),
    )
    method = data.draw(st.sampled_from(["PUT", "GET"]), label="method")
    body = data.draw(st.binary(max_size=4096), label="body") if method == "PUT" else b""
    fleet.send(path, body, method)


def _record(seq: int, **fields: Any) -> dict:
    return {"seq": seq, "time": 1.0, "kind": "event", "type": "LOG", **fields}


def _batch(fleet: Fleet, *records: dict) -> bytes:
    body = {
        "agent_id": fleet.agent_id,
        "run_id": fleet.run_id,
        "lease": fleet.lease,
        "records": list(records),
    }
    return envelope("EventBatch", body)


def _canceled_batch(fleet: Fleet, *records: dict) -> bytes:
    fleet.cancel()
    return _batch(fleet, *records)


def _register(fleet: Fleet, **fields: Any) -> bytes:
    return envelope("Register", {**to_plain(base_message("Register", fleet)), **fields})


def _register_location(fleet: Fleet, **fields: Any) -> bytes:
    location = {"name": "mutloc", "jobs": [{"name": "j"}], **fields}
    return _register(fleet, code_locations=[location])


# Messages of the right type and shape, with values the schema lets through but storage
# may not: each is sent for a fresh run, and must get a reply below 500.
KNOWN_HOSTILE: dict[str, tuple[str, Callable[[Fleet], bytes]]] = {
    "poll_held_lease_2**63": (
        "poll",
        lambda f: envelope("Poll", {"agent_id": f.agent_id, "held_leases": [2**63]}),
    ),
    "poll_held_lease_2**64-1": (
        "poll",
        lambda f: envelope("Poll", {"agent_id": f.agent_id, "held_leases": [f.lease, 2**64 - 1]}),
    ),
    "poll_stopping_lease_2**63": (
        "poll",
        lambda f: envelope("Poll", {"agent_id": f.agent_id, "stopping_leases": [2**63]}),
    ),
    "register_max_concurrent_runs_2**63": (
        "register",
        lambda f: _register(f, max_concurrent_runs=2**63),
    ),
    "register_max_concurrent_runs_-(2**63)": (
        "register",
        lambda f: _register(f, max_concurrent_runs=-(2**63)),
    ),
    "register_held_run_lease_2**64-1": (
        "register",
        lambda f: _register(f, runs=[{"run_id": f.run_id, "lease": 2**64 - 1, "state": "running"}]),
    ),
    "register_schedule_bad_cron": (
        "register",
        lambda f: _register_location(
            f, schedules=[{"name": "s", "job": "j", "cron": "not a cron"}]
        ),
    ),
    "register_schedule_impossible_date": (
        "register",
        lambda f: _register_location(
            f,
            schedules=[
                {"name": "s", "job": "j", "cron": "0 0 31 2 *", "default_status": "RUNNING"}
            ],
        ),
    ),
    "register_schedule_unknown_timezone": (
        "register",
        lambda f: _register_location(
            f,
            schedules=[
                {"name": "s", "job": "j", "cron": "0 6 * * *", "timezone": "../../etc/passwd"}
            ],
        ),
    ),
    "register_sensor_negative_interval": (
        "register",
        lambda f: _register_location(
            f, sensors=[{"name": "s", "job": "j", "minimum_interval_seconds": -1.0}]
        ),
    ),
    "heartbeat_run_lease_2**64-1": (
        "heartbeat",
        lambda f: envelope(
            "Heartbeat",
            {"agent_id": f.agent_id, "runs": [{"run_id": "r", "lease": 2**64 - 1, "state": "x"}]},
        ),
    ),
    "events_lease_2**63": (
        "events",
        lambda f: envelope(
            "EventBatch",
            {"agent_id": f.agent_id, "run_id": f.run_id, "lease": 2**63, "records": []},
        ),
    ),
    "events_seq_2**64-1": ("events", lambda f: _batch(f, _record(2**64 - 1))),
    "events_time_nan": ("events", lambda f: _batch(f, _record(1, time=math.nan))),
    "events_time_inf": ("events", lambda f: _batch(f, _record(1, time=math.inf))),
    "events_time_1e300": ("events", lambda f: _batch(f, _record(1, time=1e300))),
    "events_time_-1e300": ("events", lambda f: _batch(f, _record(1, time=-1e300))),
    "events_log_time_nan": (
        "events",
        lambda f: _batch(f, _record(1, kind="log", type="stdout", time=math.nan)),
    ),
    "events_run_failure_kind_list": (
        "events",
        lambda f: _batch(f, _record(1, type="RUN_FAILURE", data={"failure_kind": [1]})),
    ),
    "events_run_failure_kind_map": (
        "events",
        lambda f: _batch(
            f,
            _record(1, type="RUN_START"),
            _record(2, type="RUN_FAILURE", data={"failure_kind": {}}),
        ),
    ),
    "events_run_failure_kind_list_while_canceling": (
        "events",
        lambda f: _canceled_batch(f, _record(1, type="RUN_FAILURE", data={"failure_kind": [1]})),
    ),
    "events_step_failure_kind_list": (
        "events",
        lambda f: _batch(f, _record(1, type="STEP_FAILURE", data={"failure_kind": [1]})),
    ),
    "events_data_huge_int_and_bytes": (
        "events",
        lambda f: _batch(f, _record(1, data={"n": 2**64 - 1, "b": b"\xff" * 10, "f": math.nan})),
    ),
    "events_inline_output_without_step": (
        "events",
        lambda f: _batch(f, _record(1, type="STEP_SUCCESS", data={"__inline_output__": b"x"})),
    ),
    "evaluation_config_nan": (
        "evaluation",
        lambda f: envelope(
            "EvaluationResult",
            {
                "eval_id": "e",
                "agent_id": f.agent_id,
                "runs": [{"job": JOB, "config": {"x": math.nan, "b": b"\x00"}}],
            },
        ),
    ),
}


@pytest.mark.parametrize("case", KNOWN_HOSTILE)
def test_known_hostile_message(fleet: Fleet, case: str) -> None:
    endpoint, build = KNOWN_HOSTILE[case]
    fleet.new_run()
    body = build(fleet)
    status, reply = fleet.send(f"/agent/v1/{endpoint}", body)
    if status != 200:
        assert_error_reply(reply)
        return
    try:
        fleet.check_views()
    finally:
        fleet.forget(body)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("endpoint", [*ENDPOINTS, "outputs"])
def test_a_body_whose_encoding_does_not_decode_is_a_400(
    fleet: Fleet, endpoint: str, encoding: str
) -> None:
    fleet.new_run()
    method, path = "POST", f"/agent/v1/{endpoint}"
    if endpoint == "outputs":
        method = "PUT"
        path = f"/agent/v1/outputs/{fleet.run_id}/a?agent_id={fleet.agent_id}&lease={fleet.lease}"
    status, reply = fleet.client.request(
        method, path, b"not compressed at all", extra_headers={"Content-Encoding": encoding}
    )
    assert status == 400, (status, reply)
    assert_error_reply(reply)
    assert fleet.cp.get(f"/api/v1/runs/{fleet.run_id}")["status"] in ("STARTING", "STARTED")


def server_errors(log: str) -> list[str]:
    """ERROR entries of the server log, except aiohttp's own refusals of bad HTTP (it logs
    those with a traceback, and answers 400)."""
    entries = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ )", log)
    errors = [e for e in entries if " ERROR " in e.split("\n", 1)[0]]
    return [e for e in errors if "aiohttp.http_exceptions." not in e]


def test_server_survived(fleet: Fleet) -> None:
    """After all that, the control plane is up, serving, and logged no unhandled error."""
    assert fleet.cp.popen.poll() is None, fleet.cp.log()[-3000:]
    status, body = http("GET", fleet.cp.url + "/healthz")
    assert status == 200, body
    status, body = http("POST", fleet.cp.url + "/api/v1/runs", {"job": "no_such_job"})
    assert 400 <= status < 500 and isinstance(body, dict) and body, (status, body)
    fleet.new_run()  # and the agent protocol still works end to end
    errors = server_errors(fleet.cp.log())
    assert not errors, f"{len(errors)} errors in the server log; the first:\n{errors[0]}"
