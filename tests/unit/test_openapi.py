"""The OpenAPI document: valid OpenAPI 3.1, naming exactly the /api/v1 routes the app
registers, with schemas that the real handlers' answers match.

A route added to the app without a description here fails
`test_every_api_route_is_documented`, naming it; an answer that drifts from its documented
schema (or a status code the document does not list) fails the response tests.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from control_plane.config import ControlPlaneConfig
from control_plane.http import openapi
from control_plane.http.auth import ROUTE_ACCESS
from control_plane.http.openapi import OPENAPI_PATH, openapi_document
from protocol import FLEETRUN_VERSION, PROTOCOL_VERSION
from protocol.messages import CodeLocationInfo, JobInfo, OpInfo, ScheduleInfo, SensorInfo
from tests.conftest import app_for
from tests.unit.test_api import register, stored_run

DOC = openapi_document()
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"


def app_with_openapi(config: ControlPlaneConfig) -> web.Application:
    """The real app; the document's route is added here only until app.py registers it,
    so these tests pass before and after that wiring."""
    app = app_for(config)
    if not any(
        r.resource is not None and r.resource.canonical == OPENAPI_PATH for r in app.router.routes()
    ):
        openapi.add_routes(app)
    return app


def unit_config(tmp_path: Path) -> ControlPlaneConfig:
    return ControlPlaneConfig().updated(
        storage={"url": f"sqlite:///{tmp_path}/fleetrun.db"}, server={"poll_timeout_seconds": 0.5}
    )


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> TestClient:
    return await aiohttp_client(app_with_openapi(unit_config(tmp_path)))


def router_routes(app: web.Application, prefix: str = "/api/v1/") -> set[tuple[str, str]]:
    """(method, path template) of every route under `prefix` (aiohttp's implicit HEAD
    routes for GETs left out)."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith(prefix)
        and route.method != "HEAD"
    }


def documented_routes(doc: dict[str, Any], prefix: str = "/api/v1/") -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        if path.startswith(prefix)
        for method in item
        if method in METHODS
    }


# --- the document itself ---------------------------------------------------------------


def refs(value: Any) -> list[str]:
    """Every `$ref` in a JSON value."""
    if isinstance(value, dict):
        found = [value["$ref"]] if isinstance(value.get("$ref"), str) else []
        return found + [r for v in value.values() for r in refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in refs(v)]
    return []


def test_document_is_valid_openapi_31() -> None:
    """The meta-schema schemathesis checks documents with, plus what it does not check:
    every schema is valid JSON Schema 2020-12, refs resolve, path parameters match."""
    try:  # an internal module of schemathesis: without it, the structural checks remain
        from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
    except ImportError:
        validator: jsonschema_rs.Validator | None = None
    else:
        validator = OPENAPI_31_VALIDATOR
    if validator is not None:
        errors = [
            f"{'/'.join(map(str, e.instance_path))}: {e.message}"
            for e in validator.iter_errors(DOC)
        ]
        assert not errors, "\n".join(errors)
    assert DOC["openapi"] == "3.1.0" and DOC["info"]["title"] and DOC["info"]["version"]
    assert json.loads(json.dumps(DOC, allow_nan=False)) == DOC  # plain JSON types only
    for name, schema in DOC["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid({"$schema": DRAFT_2020_12, **schema}), name
    for target in refs(DOC):
        node: Any = DOC
        for part in target.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, f"dangling $ref {target}"
            node = node[part]
    op_ids = []
    for path, item in DOC["paths"].items():
        templated = {seg[1:-1] for seg in path.split("/") if seg.startswith("{")}
        for method in (m for m in item if m in METHODS):
            op = item[method]
            op_ids.append(op["operationId"])
            params = [*item.get("parameters", []), *op.get("parameters", [])]
            declared = {p["name"] for p in params if p["in"] == "path"}
            assert declared == templated, f"{method.upper()} {path}: path parameters {declared}"
            assert op["responses"], f"{method.upper()} {path} documents no response"
    assert len(op_ids) == len(set(op_ids)), "operationIds must be unique"


def test_every_api_route_is_documented(tmp_path: Path) -> None:
    app = app_with_openapi(unit_config(tmp_path))
    registered, documented = router_routes(app), documented_routes(DOC)
    missing = sorted(registered - documented)
    assert not missing, "routes missing from the OpenAPI document: " + ", ".join(
        f"{m} {p}" for m, p in missing
    )
    stale = sorted(documented - registered)
    assert not stale, "documented routes the app does not register: " + ", ".join(
        f"{m} {p}" for m, p in stale
    )
    for path in ("/healthz", "/readyz"):  # outside /api/v1, documented as well
        assert ("GET", path) in router_routes(app, path) and "get" in DOC["paths"][path]


def test_auth_and_limits_come_from_the_config() -> None:
    """Clients read the bounds this server enforces, and whether a token is optional."""
    config = ControlPlaneConfig().updated(
        limits={"max_tags_per_run": 7, "max_tag_value_length": 99}, auth={"enabled": True}
    )
    doc = openapi_document(config)
    tags = doc["components"]["schemas"]["SubmitRun"]["properties"]["tags"]
    assert tags["maxProperties"] == 7 and tags["additionalProperties"]["maxLength"] == 99
    assert doc["security"] == [{"bearer": []}]
    assert {} in DOC["security"]  # auth off by default: no token needed
    assert DOC["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    public = {
        path
        for path, item in DOC["paths"].items()
        for method, op in item.items()
        if method in METHODS and op.get("security") == []
    }
    assert {"/healthz", "/readyz", OPENAPI_PATH} <= public
    submit = DOC["paths"]["/api/v1/runs"]["post"]
    assert submit["x-fleetrun-role"] == "operator" and {"401", "403"} <= set(submit["responses"])


async def test_document_is_public_when_auth_is_on(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> None:
    """Clients read the document before they have a token; it then says one is needed."""
    if ("GET", OPENAPI_PATH) not in ROUTE_ACCESS:
        pytest.skip("GET /api/v1/openapi.json is not in auth.ROUTE_ACCESS yet")
    config = unit_config(tmp_path).updated(auth={"enabled": True})
    client = await aiohttp_client(app_with_openapi(config))
    resp = await client.get(OPENAPI_PATH)
    assert resp.status == 200
    assert (await resp.json())["security"] == [{"bearer": []}]
    assert (await client.get("/api/v1/runs")).status == 401


# --- answers of the real handlers match the document -----------------------------------


def response_schema(method: str, template: str, status: int) -> dict[str, Any]:
    responses = DOC["paths"][template][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {template} answered undocumented {status}"
    spec = responses[str(status)]
    if "$ref" in spec:
        spec = DOC["components"]["responses"][spec["$ref"].rsplit("/", 1)[1]]
    return spec["content"]["application/json"]["schema"]


def assert_documented(method: str, template: str, status: int, body: Any) -> None:
    schema = {
        "$schema": DRAFT_2020_12,
        **response_schema(method, template, status),
        "components": DOC["components"],
    }
    validator = jsonschema_rs.validator_for(schema, validate_formats=True)
    errors = [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(body)
    ]
    assert not errors, f"{method} {template} {status}:\n" + "\n".join(errors)


class Api:
    """Calls a route by its documented template and checks the answer against it."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    async def __call__(
        self,
        method: str,
        template: str,
        expect: int = 200,
        query: str = "",
        body: Any = None,
        raw: bytes | None = None,
        **params: str,
    ) -> Any:
        path = template.format(**params) + query
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        resp = await self.client.request(method, path, data=data)
        answer = await resp.json()
        assert resp.status == expect, (method, path, resp.status, answer)
        assert_documented(method, template, resp.status, answer)
        return answer


LOCATION = CodeLocationInfo(
    name="loc",
    jobs=[JobInfo(name="etl", ops=[OpInfo(name="a"), OpInfo(name="b", upstream=["a"])])],
    schedules=[ScheduleInfo(name="nightly", job="etl", cron="0 2 * * *")],
    sensors=[SensorInfo(name="watch", job="etl", minimum_interval_seconds=5.0)],
)
BROKEN = CodeLocationInfo(name="broken", error="ImportError: no module named x")


async def test_run_answers_match_the_document(client: TestClient) -> None:
    api = Api(client)
    await register(client, "w1", [LOCATION, BROKEN])
    runs, run = "/api/v1/runs", "/api/v1/runs/{run_id}"
    # A queue no agent serves keeps the run QUEUED (priority and cancel-at-once need that).
    tags = {"t": "1", "fleetrun/queue": "nobody"}
    created = await api(
        "POST", runs, 201, body={"job": "etl", "tags": tags, "config": {"n": [1, None]}}
    )
    run_id = created["run_id"]
    await api("POST", runs, 422, body={"job": "etl", "nope": 1})
    await api("POST", runs, 404, body={"job": "missing"})
    await api("POST", runs, 400, raw=b"{")
    listed = await api("GET", runs, query="?status=QUEUED,failure&limit=5&tag=t:1")
    assert [r["run_id"] for r in listed["runs"]] == [run_id]
    await api("GET", runs, 400, query="?limit=0")
    assert (await api("GET", runs, query="?agent=w1"))["runs"] == []  # not assigned
    await api("GET", run, run_id=run_id)
    await api("GET", run, 404, run_id="nope")
    assert (await api("GET", run, run_id=run_id[:8]))["run_id"] == run_id
    for twin in ("feed0000-0001", "feed0000-0002"):
        await stored_run(client, twin)
    for ambiguous in (run, run + "/events", run + "/logs"):
        await api("GET", ambiguous, 409, run_id="feed0000")
    await api("GET", run + "/events", query="?after=0&limit=10", run_id=run_id)
    await api("GET", run + "/events", 400, query="?wait=31", run_id=run_id)
    await api("GET", run + "/logs", query="?step=a", run_id=run_id)
    await api("POST", run + "/priority", body={"priority": 5}, run_id=run_id)
    await api("POST", run + "/priority", 422, body={"priority": "high"}, run_id=run_id)
    queue = await api("GET", "/api/v1/queue")
    assert queue["runs"] and queue["runs"][0]["run_id"] == run_id
    await api("POST", run + "/reexecute", 409, body={}, run_id=run_id)
    assert (await api("POST", run + "/cancel", run_id=run_id))["status"] == "CANCELED"
    await api("POST", run + "/cancel", 409, run_id=run_id)
    await api("POST", run + "/priority", 409, body={"priority": 1}, run_id=run_id)
    again = await api(
        "POST", run + "/reexecute", 201, body={"strategy": "ALL_STEPS"}, run_id=run_id
    )
    detail = await api("GET", run, run_id=again["run_id"])
    assert [link["kind"] for link in detail["chain"]] == ["original", "reexecution"]


async def test_fleet_and_token_answers_match_the_document(client: TestClient) -> None:
    api = Api(client)
    agent_id = await register(client, "w1", [LOCATION, BROKEN])
    agents = await api("GET", "/api/v1/agents")
    assert [a["agent_id"] for a in agents["agents"]] == [agent_id]
    drain = "/api/v1/agents/{agent}/drain"
    assert (await api("POST", drain, agent="w1"))["status"] == "DRAINING"
    await api("POST", drain, 404, agent="nobody")
    await api("POST", "/api/v1/agents/{agent}/undrain", agent=agent_id)
    reload = "/api/v1/agents/{agent}/reload"
    assert (await api("POST", reload, 202, body={}, agent="w1"))["location"] is None
    named = await api("POST", reload, 202, body={"location": LOCATION.name}, agent=agent_id)
    assert named["location"] == LOCATION.name
    await api("POST", reload, 404, body={"location": "nope"}, agent="w1")
    await api("POST", reload, 404, body={}, agent="nobody")
    jobs = await api("GET", "/api/v1/jobs")
    assert jobs["jobs"][0]["ops"][1]["upstream"] == ["a"] and jobs["location_errors"]
    tokens = "/api/v1/tokens"
    user = await api("POST", tokens, 201, body={"name": "alice", "kind": "user", "role": "admin"})
    assert user["token"].startswith("fru_")
    await api("POST", tokens, 201, body={"name": "w1.agent", "kind": "agent"})
    await api("POST", tokens, 409, body={"name": "alice", "kind": "user", "role": "viewer"})
    await api("POST", tokens, 422, body={"name": "bob", "kind": "agent", "role": "admin"})
    assert len((await api("GET", tokens))["tokens"]) == 2
    revoke = "/api/v1/tokens/{name}/revoke"
    assert (await api("POST", revoke, name="alice"))["revoked"] is True
    await api("POST", revoke, 404, name="alice")
    await api("GET", "/healthz")
    await api("GET", "/readyz")
    versions = await api("GET", "/api/v1/version")
    assert versions == {"version": FLEETRUN_VERSION, "protocol_version": PROTOCOL_VERSION}
    assert await api("GET", OPENAPI_PATH) == DOC


@pytest.mark.parametrize("kind,name", [("schedule", "nightly"), ("sensor", "watch")])
async def test_schedule_and_sensor_answers_match_the_document(
    client: TestClient, kind: str, name: str
) -> None:
    api = Api(client)
    await register(client, "w1", [LOCATION])
    base = f"/api/v1/{kind}s"
    (item,) = (await api("GET", base))[f"{kind}s"]
    assert item["name"] == name and item["status"] == "STOPPED"
    one = base + "/{name}"
    started = await api("POST", one + "/start", query="?location=loc", name=name)
    assert started["status"] == "RUNNING"
    shown = await api("GET", one, name=name)
    assert shown["recent_ticks"] == [] and shown["status"] == "RUNNING"
    await api("GET", one + "/ticks", query="?limit=3&location=loc", name=name)
    await api("GET", one + "/ticks", 400, query="?limit=abc", name=name)
    await api("POST", one + "/stop", name=name)
    await api("GET", one, 404, query="?location=elsewhere", name=name)
    await api("POST", one + "/start", 404, name="nope")
