"""Schema-driven fuzzing of the JSON API: requests generated from /api/v1/openapi.json for
every operation of a real control plane; no answer may be a 5xx (schemathesis's
`not_a_server_error` check), and the server must still serve at the end.

Two passes, both through schemathesis cases:
- random: schemathesis generates valid and invalid requests (hypothesis, bounded);
- edges: every query parameter the document lists, and every tag the control plane
  reads, gets each of a fixed list of hostile texts (numbers past 64 bits, non-ASCII
  digits, float spellings): values a schema-valid generator almost never produces, but
  exactly what a lenient parser (`str.isdigit`, `int`) lets through to storage.

A fake agent (msgpack, like test_fuzz_agent_api.py) registers code locations with a job,
a schedule and a sensor, and a few runs and a token exist, so generated requests can
name real runs, agents, schedules, sensors and tokens (path parameters swapped for real
ones half of the time, `job` for the real one) and reach storage rather than stopping at
a 404. Long-polls are clamped to a fraction of a second to keep the run short (~25 s;
FLEETRUN_FUZZ_EXAMPLES=300 for a deeper one). Every 5xx is reported with a curl
reproducer and the server's traceback.
"""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup

from control_plane.http.openapi import OPENAPI_PATH, openapi_document
from protocol import FLEETRUN_VERSION
from protocol.codec import decode_any, encode
from protocol.messages import (
    CodeLocationInfo,
    JobInfo,
    OpInfo,
    Register,
    Registered,
    ScheduleInfo,
    SensorInfo,
)
from tests.conftest import ControlPlaneProc, http, start_control_plane

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("FLEETRUN_FUZZ_EXAMPLES", "50"))  # per operation and mode
MAX_WAIT = 0.1  # long-poll seconds actually sent (the document allows up to 30)
TIMEOUT = 15.0  # a reply slower than this is a hang
AGENT, LOCATION, JOB = "fuzz_agent", "fuzzloc", "fuzzjob"
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # the server's state changes between runs: replaying is meaningless
    phases=[Phase.generate],  # no shrinking against a live server; reproducers are kept
    suppress_health_check=list(HealthCheck),
)
# Numbers as text the way lenient parsers take them: past 64 bits, non-ASCII digits
# (str.isdigit() accepts "²", int() accepts "١٢"), spellings int() and float() accept.
EDGE_TEXTS = [
    "99999999999999999999",
    "-99999999999999999999",
    "9223372036854775808",
    "4611686018427387905",
    "²",
    "١٢",
    "1_0",
    " 7 ",
    "+1",
    "-0",
    "1e309",
    "nan",
    "inf",
    "-inf",
    "0x10",
    "",
    "\x00",
    "a:b:c",
    ":",
    "QUEUED,",
    "x" * 5000,
]
READ_TAGS = [
    "fleetrun/priority",
    "fleetrun/max_retries",
    "fleetrun/max_runtime",
    "fleetrun/retry_strategy",
    "fleetrun/on_lost_contact",
    "fleetrun/retry_on_op_failure",
    "fleetrun/queue",
]
DOCUMENT = openapi_document()
OPERATIONS = [
    (method.upper(), path)
    for path, item in DOCUMENT["paths"].items()
    for method in item
    if method != "parameters"
]


def query_names(method: str, path: str) -> list[str]:
    item = DOCUMENT["paths"][path]
    params = [*item.get("parameters", []), *item[method.lower()].get("parameters", [])]
    return [p["name"] for p in params if p["in"] == "query"]


def takes_input(method: str, path: str) -> bool:
    """Whether invalid requests exist: any string is a valid path parameter."""
    return (
        bool(query_names(method, path)) or "requestBody" in DOCUMENT["paths"][path][method.lower()]
    )


CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode == GenerationMode.POSITIVE or takes_input(method, path)
]
SUBMIT = ("POST", "/api/v1/runs")
EDGE_CASES = [
    pytest.param(m, p, id=f"{m} {p}")
    for m, p in OPERATIONS
    if query_names(m, p) or (m, p) == SUBMIT
]


@dataclass
class Target:
    """The live control plane, its document, and the real names requests may use."""

    cp: ControlPlaneProc
    schema: Any
    session: requests.Session
    real: dict[str, list[str]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check_failures(self) -> None:
        """Fail with the first few 5xx (each with its reproducer), then start afresh."""
        found, self.failures = self.failures, []
        assert self.cp.popen.poll() is None, f"control plane died:\n{self.cp.log()[-4000:]}"
        if found:
            pytest.fail(
                f"{len(found)} server error(s); the first ones:\n\n" + "\n\n".join(found[:3]),
                pytrace=False,
            )


def agent_call(cp: ControlPlaneProc, path: str, message: Any) -> Any:
    request = urllib.request.Request(
        f"{cp.url}/agent/v1/{path}",
        data=encode(message),
        method="POST",
        headers={"Content-Type": "application/msgpack"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return decode_any(resp.read())


def seed(cp: ControlPlaneProc) -> dict[str, list[str]]:
    """A fake agent hosting a job, a schedule and a sensor (and a second location defining
    the same job and schedule names, for 409 ambiguous_name); runs queued, canceled and
    launched; a token to revoke. Returns real values for path parameters."""
    job = JobInfo(name=JOB, ops=[OpInfo(name="a"), OpInfo(name="b", upstream=["a"])])
    nightly = ScheduleInfo(name="nightly", job=JOB, cron="0 2 * * *")
    locations = [
        CodeLocationInfo(
            LOCATION, [job], schedules=[nightly], sensors=[SensorInfo(name="watch", job=JOB)]
        ),
        CodeLocationInfo("otherloc", [JobInfo(name=JOB)], schedules=[nightly]),
        CodeLocationInfo("brokenloc", error="ImportError: nope"),
    ]
    reply = agent_call(
        cp,
        "register",
        Register(
            name=AGENT,
            hostname="fuzz",
            version="0.1.0",
            queues=["default"],
            max_concurrent_runs=1000,
            code_locations=locations,
        ),
    )
    assert isinstance(reply, Registered), reply
    queued = cp.submit(JOB, location=LOCATION, tags={"fleetrun/queue": "nobody"})
    canceled = cp.submit(JOB, location=LOCATION, tags={"fleetrun/queue": "nobody"})
    assert cp.call("POST", f"/api/v1/runs/{canceled}/cancel")[0] == 200
    launched = cp.submit(JOB, location=LOCATION)
    status, _ = cp.call("POST", "/api/v1/tokens", {"name": "fuzz_token", "kind": "agent"})
    assert status == 201
    return {
        "run_id": [queued, canceled, launched],
        "agent": [AGENT, reply.agent_id],
        "name": ["nightly", "watch", "fuzz_token"],
    }


def load_schema(cp: ControlPlaneProc) -> Any:
    """The served document; the module's own until app.py registers the route.
    (`from_dict`: schemathesis's `from_url` leaves out the operation serving the document.)"""
    status, served = http("GET", cp.url + OPENAPI_PATH)
    return schemathesis.openapi.from_dict(served if status == 200 else DOCUMENT)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    cp = start_control_plane(tmp_path_factory.mktemp("openapi_fuzz"))
    session = requests.Session()
    try:
        yield Target(cp, load_schema(cp), session, seed(cp))
    finally:
        session.close()
        cp.stop()


def send(case: Case, target: Target) -> None:
    """One request; a 5xx is recorded with its reproducer and the server's log since."""
    query = case.query or {}
    wait = query.get("wait")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > MAX_WAIT:
        query["wait"] = MAX_WAIT
    log_start = len(target.cp.log())
    started = time.monotonic()
    response = case.call(base_url=target.cp.url, session=target.session, timeout=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT
    try:
        case.validate_response(response, checks=[not_a_server_error])
    except (FailureGroup, AssertionError) as exc:
        target.failures.append(
            f"{case.operation.method.upper()} {case.formatted_path} -> {response.status_code}"
            f"\n{exc}\nserver log:\n{target.cp.log()[log_start:][-4000:]}"
        )


def steer(case: Case, target: Target, data: st.DataObject) -> None:
    """Point a generated case at real runs, agents, names and the real job, often."""
    for name in list(case.path_parameters or {}):
        if name in target.real and data.draw(st.booleans(), label=f"real {name}"):
            case.path_parameters[name] = data.draw(st.sampled_from(target.real[name]))
    body = case.body
    if case.operation.path == "/api/v1/runs" and isinstance(body, dict) and "job" in body:
        if data.draw(st.integers(0, 3), label="real job") > 0:
            body["job"], body["location"] = JOB, LOCATION


@pytest.mark.parametrize("method,path,mode", CASES)
def test_random_requests(target: Target, method: str, path: str, mode: GenerationMode) -> None:
    """Schemathesis's valid or invalid requests for one operation, steered to real ids."""
    strategy = target.schema[path][method].as_strategy(generation_mode=mode)

    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        case = data.draw(strategy, label="case")
        steer(case, target, data)
        send(case, target)

    fuzz()
    target.check_failures()


@pytest.mark.parametrize("method,path", EDGE_CASES)
def test_edge_values(target: Target, method: str, path: str) -> None:
    """Each edge text in each query parameter (path parameters real); for a submit, in
    each tag the control plane reads."""
    operation = target.schema[path][method]
    templated = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
    real = {name: target.real[name][0] for name in templated}
    for name in query_names(method, path):
        for text in EDGE_TEXTS:
            send(operation.Case(path_parameters=real, query={name: text}), target)
    if (method, path) == SUBMIT:
        for tag in READ_TAGS:
            for text in EDGE_TEXTS:
                body = {"job": JOB, "location": LOCATION, "tags": {tag: text}}
                send(operation.Case(body=body, media_type="application/json"), target)
    target.check_failures()


def test_server_still_serves(target: Target) -> None:
    assert target.cp.popen.poll() is None, target.cp.log()[-4000:]
    assert target.cp.get("/healthz") == {"status": "ok", "version": FLEETRUN_VERSION}
    assert target.cp.get("/api/v1/runs/" + target.real["run_id"][0])["job"] == JOB
    assert target.cp.submit(JOB, location=LOCATION)


BODY_OPERATIONS = [
    pytest.param(m, p, id=f"{m} {p}")
    for m, p in OPERATIONS
    if "requestBody" in DOCUMENT["paths"][p][m.lower()]
]
# Bodies no JSON route may answer with a 5xx (issue 20): nested past any parser's stack,
# text that is not Unicode where each string field sits, and a Content-Encoding the
# bytes do not have. Each body goes through the raw socket layer of `requests`.
HOSTILE_BODIES: dict[str, tuple[bytes, dict[str, str]]] = {
    "array 5000 deep": (b"[" * 5000 + b"]" * 5000, {}),
    "object 5000 deep": (b'{"a":' * 5000 + b"1" + b"}" * 5000, {}),
    "config 900 deep": (b'{"job":"x","config":' + b'{"a":' * 900 + b"1" + b"}" * 901, {}),
    "gzip that is not": (b"this is not gzip", {"Content-Encoding": "gzip"}),
    "deflate that is not": (b"this is not deflate", {"Content-Encoding": "deflate"}),
}
SURROGATE_FIELDS = ["job", "location", "strategy", "name", "kind", "role"]


@pytest.mark.parametrize("method,path", BODY_OPERATIONS)
def test_hostile_bodies_get_a_4xx_naming_the_problem(
    target: Target, method: str, path: str
) -> None:
    templated = [seg[1:-1] for seg in path.split("/") if seg.startswith("{")]
    url = target.cp.url + path.format(**{name: target.real[name][0] for name in templated})
    bodies = dict(HOSTILE_BODIES)
    for field_name in SURROGATE_FIELDS:
        bodies[f"lone surrogate in {field_name}"] = (
            b'{"job":"%s","%s":"\\ud800"}' % (JOB.encode(), field_name.encode()),
            {},
        )
    bodies["lone surrogate in a tag key"] = (b'{"job":"x","tags":{"\\ud800":"v"}}', {})
    bodies["lone surrogate in a tag value"] = (b'{"job":"x","tags":{"k":"\\udfff"}}', {})
    bodies["config 2**64"] = (
        b'{"job":"%s","config":{"n":18446744073709551616}}' % JOB.encode(),
        {},
    )
    for what, (body, headers) in bodies.items():
        response = target.session.request(
            method,
            url,
            data=body,
            timeout=TIMEOUT,
            headers={"Content-Type": "application/json", **headers},
        )
        assert 400 <= response.status_code < 500, (what, response.status_code, response.text)
        assert response.json()["error"]["message"], (what, response.text)
    login = target.session.post(
        target.cp.url + "/ui/login",
        data=b"token=x",
        timeout=TIMEOUT,
        headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip"},
    )
    assert 400 <= login.status_code < 500, login.text
    target.check_failures()
