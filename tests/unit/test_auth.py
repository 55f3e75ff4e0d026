"""Auth on a real app and SQLite file: the route-by-token matrix, agent identity, token
storage and revocation, and the request limits.

Tokens are made the way `fleetrun tokens create --config` makes them (straight in the
database, before the control plane starts), then used over HTTP like any client would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import msgpack
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from control_plane.config import ControlPlaneConfig
from control_plane.http.auth import CACHE_SECONDS, ROUTE_ACCESS
from control_plane.http.keys import DISPATCHER, STORAGE
from control_plane.http.tokens import create_token
from control_plane.storage.sqlite import SqliteStorage
from protocol import PROTOCOL_VERSION
from protocol.codec import decode, encode
from protocol.messages import (
    CodeLocationInfo,
    Drain,
    ErrorReply,
    EvaluationResult,
    EventAck,
    EventBatch,
    Heartbeat,
    JobInfo,
    OpInfo,
    Poll,
    PollReply,
    Register,
    Registered,
    RunRecord,
)
from tests.conftest import app_for

# What each route needs, written out independently of control_plane/http/auth.py: a route
# the router has and this table lacks fails test_the_matrix_covers_every_route.
EXPECTED: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public",
    ("GET", "/api/v1/version"): "public",
    ("GET", "/"): "public",
    ("GET", "/ui/runs"): "viewer",
    ("GET", "/ui/runs/{run_id}"): "viewer",
    ("GET", "/ui/agents"): "viewer",
    ("GET", "/ui/queue"): "viewer",
    ("GET", "/ui/pools"): "viewer",
    ("GET", "/ui/jobs"): "viewer",
    ("GET", "/ui/jobs/{location}/{job}"): "viewer",
    ("GET", "/ui/launch"): "viewer",
    ("GET", "/ui/schedules"): "viewer",
    ("GET", "/ui/schedules/{name}"): "viewer",
    ("GET", "/ui/sensors"): "viewer",
    ("GET", "/ui/sensors/{name}"): "viewer",
    ("GET", "/ui/alerts"): "viewer",
    ("GET", "/ui/login"): "public",
    ("POST", "/ui/login"): "public",
    ("POST", "/ui/logout"): "public",
    ("GET", "/ui/static/{name}"): "public",
    ("GET", "/metrics"): "public",
    ("POST", "/api/v1/runs"): "operator",
    ("GET", "/api/v1/runs"): "viewer",
    ("GET", "/api/v1/runs/{run_id}"): "viewer",
    ("GET", "/api/v1/runs/{run_id}/events"): "viewer",
    ("GET", "/api/v1/runs/{run_id}/logs"): "viewer",
    ("POST", "/api/v1/runs/{run_id}/priority"): "operator",
    ("POST", "/api/v1/runs/{run_id}/cancel"): "operator",
    ("POST", "/api/v1/runs/{run_id}/reexecute"): "operator",
    ("DELETE", "/api/v1/runs/{run_id}"): "admin",
    ("GET", "/api/v1/queue"): "viewer",
    ("GET", "/api/v1/agents"): "viewer",
    ("POST", "/api/v1/agents/{agent}/drain"): "operator",
    ("POST", "/api/v1/agents/{agent}/undrain"): "operator",
    ("POST", "/api/v1/agents/{agent}/reload"): "operator",
    ("GET", "/api/v1/jobs"): "viewer",
    ("GET", "/api/v1/pools"): "viewer",
    ("PUT", "/api/v1/pools/{name}"): "operator",
    ("DELETE", "/api/v1/pools/{name}"): "operator",
    ("GET", "/api/v1/alerts"): "viewer",
    ("GET", "/api/v1/openapi.json"): "public",
    ("GET", "/api/v1/tokens"): "admin",
    ("POST", "/api/v1/tokens"): "admin",
    ("POST", "/api/v1/tokens/{name}/revoke"): "admin",
    ("GET", "/api/v1/schedules"): "viewer",
    ("GET", "/api/v1/schedules/{name}"): "viewer",
    ("GET", "/api/v1/schedules/{name}/ticks"): "viewer",
    ("POST", "/api/v1/schedules/{name}/start"): "operator",
    ("POST", "/api/v1/schedules/{name}/stop"): "operator",
    ("GET", "/api/v1/sensors"): "viewer",
    ("GET", "/api/v1/sensors/{name}"): "viewer",
    ("GET", "/api/v1/sensors/{name}/ticks"): "viewer",
    ("POST", "/api/v1/sensors/{name}/start"): "operator",
    ("POST", "/api/v1/sensors/{name}/stop"): "operator",
    ("POST", "/agent/v1/register"): "agent",
    ("POST", "/agent/v1/poll"): "agent",
    ("POST", "/agent/v1/heartbeat"): "agent",
    ("POST", "/agent/v1/events"): "agent",
    ("POST", "/agent/v1/drain"): "agent",
    ("POST", "/agent/v1/locations"): "agent",
    ("POST", "/agent/v1/evaluation"): "agent",
    ("GET", "/agent/v1/version"): "agent",
    ("PUT", "/agent/v1/outputs/{run_id}/{step}"): "agent",
    ("GET", "/agent/v1/outputs/{run_id}/{step}"): "agent",
}
ROLE_ORDER = ["viewer", "operator", "admin"]
CALLERS = ["none", "bad", "revoked", "agent", "viewer", "operator", "admin"]


@dataclass
class Instance:
    client: TestClient
    tokens: dict[str, str]
    db: Path


async def _make_tokens(db: Path, specs: dict[str, tuple[str, str | None]]) -> dict[str, str]:
    storage = SqliteStorage(str(db))
    await storage.open()
    try:
        made = {}
        for name, (kind, role) in specs.items():
            made[name], _ = await create_token(storage, name, kind, role, time.time())
        await storage.revoke_token("revoked", time.time())
        return made
    finally:
        await storage.close()


TOKEN_SPECS = {
    "agent": ("agent", None),
    "agent2": ("agent", None),
    "agent3": ("agent", None),
    "viewer": ("user", "viewer"),
    "operator": ("user", "operator"),
    "admin": ("user", "admin"),
    "revoked": ("user", "admin"),
}


@pytest.fixture
async def instance(
    aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path
) -> Instance:
    db = tmp_path / "fleetrun.db"
    tokens = await _make_tokens(db, TOKEN_SPECS)
    config = ControlPlaneConfig().updated(
        storage={"url": f"sqlite:///{db}"},
        server={"poll_timeout_seconds": 0.3},
        auth={"enabled": True},
    )
    client = await aiohttp_client(app_for(config))
    return Instance(client, tokens, db)


def _headers(inst: Instance, caller: str) -> dict[str, str]:
    if caller == "none":
        return {}
    if caller == "bad":
        return {"Authorization": "Bearer fru_0123456789abcdef_" + "x" * 43}
    return {"Authorization": f"Bearer {inst.tokens[caller]}"}


def _expected(required: str, caller: str) -> str:
    """'ok' (anything but 401/403), '401' or '403'."""
    if required == "public":
        return "ok"
    if caller in ("none", "bad", "revoked"):
        return "401"
    if required == "agent":
        return "ok" if caller == "agent" else "403"
    if caller == "agent":
        return "403"
    return "ok" if ROLE_ORDER.index(caller) >= ROLE_ORDER.index(required) else "403"


def _concrete(path: str) -> str:
    return (
        path.replace("{run_id}", "r1")
        .replace("{step}", "s1")
        .replace("{agent}", "a1")
        .replace("{name}", "n1")
        .replace("{location}", "l1")
        .replace("{job}", "j1")
    )


def _router_routes(app: web.Application) -> set[tuple[str, str]]:
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


async def test_the_matrix_covers_every_route(instance: Instance) -> None:
    routes = _router_routes(instance.client.app)
    assert routes == set(EXPECTED), "a route without an entry in the auth matrix (or stale)"
    assert set(ROUTE_ACCESS) == routes, "control_plane/http/auth.py ROUTE_ACCESS and the router"


async def test_every_route_against_every_kind_of_token(instance: Instance) -> None:
    failures = []
    for (method, path), required in sorted(EXPECTED.items()):
        for caller in CALLERS:
            resp = await instance.client.request(
                method,
                _concrete(path),
                data=b"{}",
                headers=_headers(instance, caller),
                allow_redirects=False,
            )
            got = str(resp.status) if resp.status in (401, 403) else "ok"
            want = _expected(required, caller)
            if path.startswith("/ui/") and want != "ok":
                # a page answers a refusal with the sign-in form instead
                to_login = resp.headers.get("Location", "").startswith("/ui/login")
                got, want = ("refused" if resp.status == 303 and to_login else got), "refused"
            if got != want:
                failures.append(f"{method} {path} as {caller}: {resp.status}, expected {want}")
            if resp.status == 401:
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert resp.status < 500, (method, path, caller, await resp.text())
    assert not failures, "\n".join(failures)


async def test_malformed_authorization_headers_are_401(instance: Instance) -> None:
    for header in [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "x" * 40,
        "Bearer " + "a" * 10_000,
        "Bearer fru_nounderscoresecret",
        "Bearer fra_" + "0" * 16 + "_",
    ]:
        resp = await instance.client.get("/api/v1/runs", headers={"Authorization": header})
        assert resp.status in (400, 401), header  # 400: aiohttp refuses a 10 KB header
        if resp.status == 401:
            body = await resp.json()
            assert body["error"]["code"] in ("unauthenticated", "bad_token")


async def test_an_agent_token_of_the_right_kind_but_wrong_prefix_is_refused(
    instance: Instance,
) -> None:
    agent = instance.tokens["agent"]
    forged = "fru" + agent[3:]  # the agent's secret under the user prefix
    resp = await instance.client.get("/api/v1/runs", headers={"Authorization": f"Bearer {forged}"})
    assert resp.status == 401


# --- agents act only for themselves ---------------------------------------------------


async def agent_call(inst: Instance, token: str, path: str, message: Any, reply: type) -> Any:
    resp = await inst.client.post(
        f"/agent/v1/{path}", data=encode(message), headers=_headers(inst, token)
    )
    body = await resp.read()
    if resp.status != 200:
        return resp.status, decode(body, ErrorReply).code
    return decode(body, reply)


def _register(name: str) -> Register:
    loc = CodeLocationInfo(name="loc", jobs=[JobInfo(name="etl", ops=[OpInfo(name="a")])])
    return Register(
        name=name,
        hostname="h",
        version="0.1",
        queues=["default"],
        max_concurrent_runs=2,
        code_locations=[loc],
    )


async def test_an_agent_cannot_act_for_another_agent(instance: Instance) -> None:
    a = (await agent_call(instance, "agent", "register", _register("wa"), Registered)).agent_id
    b = (await agent_call(instance, "agent2", "register", _register("wb"), Registered)).agent_id
    await agent_call(instance, "agent2", "drain", Drain(agent_id=b), object)  # b takes nothing
    resp = await instance.client.post(
        "/api/v1/runs", json={"job": "etl"}, headers=_headers(instance, "operator")
    )
    run_id = (await resp.json())["run_id"]
    launch = (await agent_call(instance, "agent", "poll", Poll(agent_id=a), PollReply)).launches[0]
    start = RunRecord(seq=1, time=1.0, kind="event", type="RUN_START")

    # agent2's token, naming agent a (whatever ids it sends, its identity is its token)
    assert await agent_call(instance, "agent2", "poll", Poll(agent_id=a), PollReply) == (
        403,
        "not_this_agent",
    )
    hb = Heartbeat(agent_id=a, runs=[])
    assert await agent_call(instance, "agent2", "heartbeat", hb, object) == (403, "not_this_agent")
    batch = EventBatch(agent_id=a, run_id=run_id, lease=launch.lease, records=[start])
    assert await agent_call(instance, "agent2", "events", batch, EventAck) == (
        403,
        "not_this_agent",
    )
    assert await agent_call(instance, "agent2", "drain", Drain(agent_id=a), object) == (
        403,
        "not_this_agent",
    )
    result = EvaluationResult(eval_id="e", agent_id=a)
    assert await agent_call(instance, "agent2", "evaluation", result, object) == (
        403,
        "not_this_agent",
    )
    # ... or naming itself, for a run leased to a
    batch = EventBatch(agent_id=b, run_id=run_id, lease=launch.lease, records=[start])
    assert await agent_call(instance, "agent2", "events", batch, EventAck) == (403, "not_your_run")
    for agent_id, code in ((a, "not_this_agent"), (b, "not_your_run")):
        query = f"agent_id={agent_id}&lease={launch.lease}"
        put = await instance.client.put(
            f"/agent/v1/outputs/{run_id}/a?{query}", data=b"x", headers=_headers(instance, "agent2")
        )
        assert (put.status, decode(await put.read(), ErrorReply).code) == (403, code)
        get = await instance.client.get(
            f"/agent/v1/outputs/{run_id}/a?{query}&run_id={run_id}",
            headers=_headers(instance, "agent2"),
        )
        assert (get.status, decode(await get.read(), ErrorReply).code) == (403, code)
    # nor register under a's name while a is online with a valid token
    assert await agent_call(instance, "agent2", "register", _register("wa"), Registered) == (
        409,
        "agent_name_taken",
    )
    # a itself is unaffected, and its own writes work
    batch = EventBatch(agent_id=a, run_id=run_id, lease=launch.lease, records=[start])
    assert (await agent_call(instance, "agent", "events", batch, EventAck)).acked_seq == 1
    run = await (
        await instance.client.get(f"/api/v1/runs/{run_id}", headers=_headers(instance, "viewer"))
    ).json()
    assert (run["status"], run["agent"]) == ("STARTED", a)


async def test_an_agent_reads_only_outputs_its_own_reexecution_reuses(instance: Instance) -> None:
    a = (await agent_call(instance, "agent", "register", _register("wa"), Registered)).agent_id
    ops = _headers(instance, "operator")
    run_id = (
        await (await instance.client.post("/api/v1/runs", json={"job": "etl"}, headers=ops)).json()
    )["run_id"]
    lease = (
        (await agent_call(instance, "agent", "poll", Poll(agent_id=a), PollReply)).launches[0].lease
    )
    put = await instance.client.put(
        f"/agent/v1/outputs/{run_id}/a?agent_id={a}&lease={lease}",
        data=b"pickled",
        headers=_headers(instance, "agent"),
    )
    assert put.status == 200
    # the run itself does not reuse its own output: reading it this way is refused
    query = f"agent_id={a}&run_id={run_id}&lease={lease}"
    get = await instance.client.get(
        f"/agent/v1/outputs/{run_id}/a?{query}", headers=_headers(instance, "agent")
    )
    assert (get.status, decode(await get.read(), ErrorReply).code) == (403, "not_reused")


async def test_a_revoked_agent_token_can_be_replaced_by_a_new_one(instance: Instance) -> None:
    a = (await agent_call(instance, "agent", "register", _register("wa"), Registered)).agent_id
    admin = _headers(instance, "admin")
    resp = await instance.client.post("/api/v1/tokens/agent/revoke", headers=admin)
    assert resp.status == 200 and (await resp.json())["revoked"] is True
    assert await agent_call(instance, "agent", "poll", Poll(agent_id=a), PollReply) == (
        401,
        "revoked_token",
    )
    # the rotated token takes the agent over (same id: its runs go on) ...
    again = await agent_call(instance, "agent2", "register", _register("wa"), Registered)
    assert again.agent_id == a
    assert isinstance(
        await agent_call(instance, "agent2", "poll", Poll(agent_id=a), PollReply), PollReply
    )
    # ... and from then on no other token may act for it
    assert await agent_call(instance, "agent3", "poll", Poll(agent_id=a), PollReply) == (
        403,
        "not_this_agent",
    )
    assert await agent_call(instance, "agent3", "register", _register("wa"), Registered) == (
        409,
        "agent_name_taken",
    )


# --- tokens at rest, in answers, and revocation -----------------------------------------


async def test_tokens_are_stored_only_as_salted_hashes_and_never_shown(
    instance: Instance,
) -> None:
    admin = _headers(instance, "admin")
    resp = await instance.client.post(
        "/api/v1/tokens", headers=admin, json={"name": "ci", "kind": "user", "role": "viewer"}
    )
    assert resp.status == 201
    created = await resp.json()
    token = created["token"]
    assert token.startswith("fru_") and created["role"] == "viewer"
    secret = token.split("_", 2)[2]
    listing = await (await instance.client.get("/api/v1/tokens", headers=admin)).text()
    assert "ci" in listing and secret not in listing and "hash" not in listing
    resp = await instance.client.post(
        "/api/v1/tokens", headers=admin, json={"name": "ci", "kind": "user", "role": "viewer"}
    )
    assert resp.status == 409  # names are never reused
    bad = await instance.client.get("/api/v1/runs", headers={"Authorization": f"Bearer {token}x"})
    assert bad.status == 401 and secret not in await bad.text()
    assert (
        await instance.client.get("/api/v1/runs", headers={"Authorization": f"Bearer {token}"})
    ).status == 200
    await instance.client.app[STORAGE].close()  # flush, then read the file
    raw = b"".join(p.read_bytes() for p in instance.db.parent.glob("fleetrun.db*"))
    for value in (*instance.tokens.values(), token):
        assert value.split("_", 2)[2].encode() not in raw


async def test_a_revocation_made_elsewhere_applies_within_the_cache_time(
    instance: Instance,
) -> None:
    """`fleetrun tokens revoke --config` writes to the database from another process."""
    viewer = _headers(instance, "viewer")
    assert (await instance.client.get("/api/v1/runs", headers=viewer)).status == 200
    other = SqliteStorage(str(instance.db))
    await other.open()
    await other.revoke_token("viewer", time.time())
    await other.close()
    revoked_at = time.monotonic()
    while (await instance.client.get("/api/v1/runs", headers=viewer)).status == 200:
        assert time.monotonic() - revoked_at < CACHE_SECONDS + 5, "revocation never applied"
        await asyncio.sleep(0.05)
    resp = await instance.client.get("/api/v1/runs", headers=viewer)
    assert (resp.status, (await resp.json())["error"]["code"]) == (401, "revoked_token")


async def test_tokens_cli_creates_lists_and_revokes_in_the_database(tmp_path: Path) -> None:
    from control_plane.cli import main

    config = tmp_path / "control-plane.toml"
    config.write_text('[storage]\nurl = "sqlite:///fleetrun.db"\n[auth]\nenabled = true\n')
    base = ["tokens"]
    code = await asyncio.to_thread(
        main,
        [
            *base,
            "create",
            "--config",
            str(config),
            "--kind",
            "user",
            "--name",
            "ops",
            "--role",
            "operator",
        ],
    )
    assert code == 0
    code = await asyncio.to_thread(
        main, [*base, "create", "--config", str(config), "--kind", "user", "--name", "nobody"]
    )
    assert code == 1  # a user token needs a role
    code = await asyncio.to_thread(main, ["--json", *base, "list", "--config", str(config)])
    assert code == 0
    code = await asyncio.to_thread(main, [*base, "revoke", "ops", "--config", str(config)])
    assert code == 0
    storage = SqliteStorage(str(tmp_path / "fleetrun.db"))
    await storage.open()
    (record,) = await storage.list_tokens()
    await storage.close()
    assert (record.name, record.kind, record.role) == ("ops", "user", "operator")
    assert record.revoked_time is not None and len(record.hash) == 32 and len(record.salt) == 16


# --- limits -------------------------------------------------------------------------------


@pytest.fixture
async def limited(aiohttp_client: Callable[..., Awaitable[TestClient]], tmp_path: Path) -> Any:
    limits = {
        "max_body_bytes": 64 * 1024,
        "max_tags_per_run": 4,
        "max_tag_value_length": 16,
        "max_run_config_bytes": 100,
        "max_polls_per_agent": 2,
        "max_events_per_batch": 500,
    }
    config = ControlPlaneConfig().updated(
        storage={"url": f"sqlite:///{tmp_path}/fleetrun.db"},
        server={"poll_timeout_seconds": 5},
        limits=limits,
    )
    return await aiohttp_client(app_for(config))


def _envelope(body: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": "Heartbeat", "body": body})


async def _error(resp: Any) -> tuple[int, str, str]:
    raw = await resp.read()
    if resp.content_type == "application/msgpack":
        err = decode(raw, ErrorReply)
        return resp.status, err.code, err.message
    body = json.loads(raw)["error"]
    return resp.status, body["code"], body["message"]


async def test_every_limit_answers_with_a_4xx_naming_it(limited: TestClient) -> None:
    big = await limited.post("/api/v1/runs", data=b"{" + b" " * 70_000 + b"}")
    status, code, message = await _error(big)
    assert status == 413 and "65536" in message
    deep = await limited.post(
        "/agent/v1/heartbeat",
        data=_envelope(
            {
                "agent_id": "a",
                "runs": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
            }
        ),
    )
    assert (await _error(deep))[:2] == (400, "too_deep")
    tags = {f"k{i}": "v" for i in range(5)}
    status, code, message = await _error(
        await limited.post("/api/v1/runs", json={"job": "x", "tags": tags})
    )
    assert (status, code) == (422, "too_many_tags") and "max_tags_per_run" in message
    status, _, message = await _error(
        await limited.post("/api/v1/runs", json={"job": "x", "tags": {"k": "v" * 17}})
    )
    assert status == 422 and "max_tag_value_length" in message
    status, code, message = await _error(
        await limited.post("/api/v1/runs", json={"job": "x", "config": {"k": "v" * 200}})
    )
    assert (status, code) == (413, "run_config_too_large") and "max_run_config_bytes" in message
    records = [
        RunRecord(seq=i, time=1.0, kind="log", type="stdout", message="x") for i in range(1, 502)
    ]
    batch = EventBatch(agent_id="a", run_id="r", lease=1, records=records)
    status, code, message = await _error(await limited.post("/agent/v1/events", data=encode(batch)))
    assert (status, code) == (413, "too_many_events") and "max_events_per_batch" in message
    ext = msgpack.packb(
        {
            "v": PROTOCOL_VERSION,
            "type": "Heartbeat",
            "body": {"agent_id": msgpack.ExtType(5, b"x"), "runs": []},
        }
    )
    assert (await _error(await limited.post("/agent/v1/heartbeat", data=ext)))[:2] == (
        400,
        "bad_msgpack",
    )
    assert (await limited.get("/healthz")).status == 200


async def test_at_most_two_polls_per_agent_are_parked(limited: TestClient) -> None:
    """A third poll from one agent ends the oldest at once (its client most likely went
    away with a half-open connection), so one agent never holds more than the limit."""
    resp = await limited.post("/agent/v1/register", data=encode(_register("w")))
    agent_id = decode(await resp.read(), Registered).agent_id
    dispatcher = limited.app[DISPATCHER]

    async def poll() -> PollReply:
        resp = await limited.post("/agent/v1/poll", data=encode(Poll(agent_id=agent_id)))
        return decode(await resp.read(), PollReply)

    first = asyncio.create_task(poll())
    second = asyncio.create_task(poll())
    for _ in range(200):
        if dispatcher.parked_polls(agent_id) == 2:
            break
        await asyncio.sleep(0.01)
    assert dispatcher.parked_polls(agent_id) == 2
    third = asyncio.create_task(poll())
    done, _ = await asyncio.wait(
        {first, second, third}, timeout=4, return_when=asyncio.FIRST_COMPLETED
    )
    assert done == {first} and first.result() == PollReply()
    assert dispatcher.parked_polls(agent_id) == 2
    for task in (second, third):
        task.cancel()


async def test_sql_never_carries_request_text(
    instance: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every statement is parameterised: a hostile tag value never appears in the SQL
    text handed to SQLite (only in its parameters)."""
    await agent_call(instance, "agent", "register", _register("wa"), Registered)
    statements: list[str] = []
    for method in ("execute", "execute_fetchall", "executemany"):
        original = getattr(aiosqlite.Connection, method)

        def recording(self: Any, sql: str, *args: Any, _original: Any = original) -> Any:
            statements.append(sql)
            return _original(self, sql, *args)

        monkeypatch.setattr(aiosqlite.Connection, method, recording)
    marker = "zq'); DROP TABLE runs;--"
    resp = await instance.client.post(
        "/api/v1/runs",
        headers=_headers(instance, "operator"),
        json={"job": "etl", "tags": {"t": marker}, "config": {"x": marker}},
    )
    assert resp.status == 201
    listing = await instance.client.get(
        f"/api/v1/runs?tag=t:{marker}", headers=_headers(instance, "viewer")
    )
    assert len((await listing.json())["runs"]) == 1
    assert any(s.startswith("INSERT INTO runs") for s in statements)
    assert not [s for s in statements if "zq" in s]
