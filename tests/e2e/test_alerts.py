"""Alerts end to end: a real control plane (in a thread of this process, so that the
delivery policy can be shortened), a real agent process, and a webhook receiver this test
runs on loopback. Every wait is on a condition."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import control_plane.daemon.webhooks
from control_plane.daemon.webhooks import DeliveryPolicy
from tests.clocks import OffsetClock
from tests.conftest import (
    EXAMPLES,
    FIXTURES,
    ControlPlaneProc,
    Proc,
    ThreadedControlPlane,
    free_port,
    start_agent,
    wait_for,
)

JOBS = {"monitor": FIXTURES / "monitor_jobs.py", "examples": EXAMPLES}
FAST = DeliveryPolicy(timeout_seconds=2.0, first_retry_seconds=0.5, max_retry_seconds=2.0)


@dataclass
class Received:
    time: float
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    """A webhook on 127.0.0.1: answers each POST with the next status of `script`, then
    `status`; holds it `hang` seconds first while `hang` is set."""

    port: int = field(default_factory=free_port)
    status: int = 200
    script: list[int] = field(default_factory=list)
    hang: float = 0.0
    received: list[Received] = field(default_factory=list)
    hanging: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None
    _released: asyncio.Event = field(default_factory=asyncio.Event)  # ends every hang

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook/secret-part"

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append(
            Received(time.monotonic(), dict(request.headers), await request.json())
        )
        if self.hang:
            self.hanging += 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), self.hang)
            finally:
                self.hanging -= 1
        status = self.script.pop(0) if self.script else self.status
        return web.Response(status=status, text="" if status < 300 else "receiver says no")

    async def _serve(self, ready: threading.Event) -> None:
        app = web.Application()
        app.router.add_post("/hook/secret-part", self._hook)
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._stop = asyncio.Event()
        ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def start(self) -> Receiver:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve(ready))
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "the receiver did not start"
        return self

    def stop(self) -> None:
        self.hang = 0.0
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._released.set)
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def bodies(self, event: str) -> list[dict[str, Any]]:
        return [r.body for r in self.received if r.body["event"] == event]


def alerts_config(url: str, *events: str, heartbeat_timeout: float = 30) -> str:
    on = ", ".join(f'"{e}"' for e in events)
    return (
        f"[run_monitoring]\nagent_heartbeat_timeout_seconds = {heartbeat_timeout}\n"
        f'[[alerts]]\nname = "oncall"\non = [{on}]\nwebhook_url = "{url}"\n'
    )


def deliveries(cp: ControlPlaneProc, key: str) -> list[dict[str, Any]]:
    return [d for d in cp.get("/api/v1/alerts?limit=1000")["deliveries"] if d["key"] == key]


def delivery(cp: ControlPlaneProc, key: str, **wanted: Any) -> dict[str, Any] | None:
    """The one delivery of `key`, once it has the `wanted` fields."""
    found = deliveries(cp, key)
    assert len(found) <= 1, found
    if found and all(found[0][k] == v for k, v in wanted.items()):
        return found[0]
    return None


def metrics(cp: ControlPlaneProc) -> str:
    with urllib.request.urlopen(cp.url + "/metrics", timeout=30) as resp:
        return resp.read().decode()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver().start()
    yield hook
    hook.stop()


@pytest.fixture
def fast_delivery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_plane.daemon.webhooks, "POLICY", FAST)


@dataclass
class Fleet:
    cp: ThreadedControlPlane
    agent: Proc
    folder: Path


@pytest.fixture
def fleet(tmp_path: Path, receiver: Receiver, fast_delivery: None) -> Iterator[Fleet]:
    cp = ThreadedControlPlane.start(
        tmp_path, OffsetClock(), alerts_config(receiver.url, "run_failure")
    )
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    yield Fleet(cp, agent, tmp_path)
    agent.stop()
    cp.stop()


def test_a_failing_run_is_announced_once_with_its_details(fleet: Fleet, receiver: Receiver) -> None:
    cp = fleet.cp
    run_id = cp.submit("op_fails")
    assert cp.wait_run(run_id)["status"] == "FAILURE"
    key = f"run_failure/{run_id}"
    sent = wait_for(lambda: delivery(cp, key, status="sent"), what="the alert to be sent")
    assert sent["attempts"] == 1 and sent["alert"] == "oncall" and sent["last_error"] is None
    (got,) = [r for r in receiver.received if r.body["run_id"] == run_id]
    body = got.body
    assert body["text"].startswith(f"[fleetrun] oncall: run {run_id} of job op_fails failed: ")
    assert (body["alert"], body["event"], body["job"], body["status"]) == (
        "oncall",
        "run_failure",
        "op_fails",
        "FAILURE",
    )
    assert body["reason"] == cp.get(f"/api/v1/runs/{run_id}")["status_reason"]
    assert body["url"].endswith(f"/ui/runs/{run_id}") and body["key"] == key
    assert body["time"].endswith("Z")
    assert got.headers["Idempotency-Key"] == got.headers["X-Fleetrun-Alert-Id"] == f"oncall/{key}"
    assert got.headers["Content-Type"].startswith("application/json")
    # A second failure gets its own alert; the first is still announced exactly once
    second = cp.submit("op_fails")
    wait_for(lambda: delivery(cp, f"run_failure/{second}", status="sent"), what="the second alert")
    assert sorted(r.body["run_id"] for r in receiver.received) == sorted([run_id, second])
    succeeded = cp.submit("hello")
    assert cp.wait_run(succeeded)["status"] == "SUCCESS"
    assert deliveries(cp, f"run_failure/{succeeded}") == []
    assert 'fleetrun_alerts_sent_total{event="run_failure"} 2.0' in metrics(cp)


def test_a_failing_receiver_gets_the_alert_after_retries(fleet: Fleet, receiver: Receiver) -> None:
    cp = fleet.cp
    receiver.script = [500, 500]
    run_id = cp.submit("op_fails")
    key = f"run_failure/{run_id}"
    sent = wait_for(lambda: delivery(cp, key, status="sent"), timeout=60, what="the alert")
    assert sent["attempts"] == 3
    assert sent["last_error"] == "HTTP 500: receiver says no"  # the history keeps it
    tries = [r for r in receiver.received if r.body["run_id"] == run_id]
    assert len(tries) == 3
    assert {r.headers["Idempotency-Key"] for r in tries} == {f"oncall/{key}"}
    gaps = [b.time - a.time for a, b in itertools.pairwise(tries)]
    assert gaps[0] >= 0.4 and gaps[1] >= 0.9, gaps  # 0.5 s, then 1 s of backoff


def test_a_hanging_receiver_does_not_slow_the_control_plane(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = DeliveryPolicy(timeout_seconds=10.0, first_retry_seconds=0.5, max_attempts=2)
    monkeypatch.setattr(control_plane.daemon.webhooks, "POLICY", policy)
    receiver.hang = 60.0
    cp = ThreadedControlPlane.start(
        tmp_path, OffsetClock(), alerts_config(receiver.url, "run_failure")
    )
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        failing = cp.submit("op_fails")
        wait_for(lambda: receiver.hanging, what="the receiver to hold the alert")
        held_since = time.monotonic()
        # While the receiver holds the POST, runs are submitted, dispatched and finish
        for _ in range(2):
            run_id = cp.submit("hello")
            assert cp.wait_run(run_id, timeout=30)["status"] == "SUCCESS"
        assert receiver.hanging and time.monotonic() - held_since < policy.timeout_seconds
        # The attempt times out; the second times out too, and the alert fails for good
        key = f"run_failure/{failing}"
        failed = wait_for(lambda: delivery(cp, key, status="failed"), timeout=60, what="failed")
        assert failed["attempts"] == 2 and failed["last_error"] == "no answer within 10 s"
        text = metrics(cp)
        assert 'fleetrun_alerts_failed_total{event="run_failure"} 1.0' in text
        assert 'fleetrun_alert_attempts_failed_total{event="run_failure"} 1.0' in text
    finally:
        agent.stop()
        cp.stop()


def test_an_alert_pending_across_a_restart_arrives_once(
    tmp_path: Path, receiver: Receiver, fast_delivery: None
) -> None:
    receiver.status = 500
    config = alerts_config(receiver.url, "run_failure")
    cp = ThreadedControlPlane.start(tmp_path, OffsetClock(), config)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        run_id = cp.submit("op_fails")
        key = f"run_failure/{run_id}"
        wait_for(
            lambda: (d := delivery(cp, key, status="pending")) and d["attempts"] >= 2,
            what="failed attempts",
        )
    finally:
        agent.stop()
        cp.stop()
    # A new control plane on the same database, and the receiver works again
    receiver.status = 200
    before = len(receiver.received)
    cp = ThreadedControlPlane.start(tmp_path, OffsetClock(), config)
    try:
        sent = wait_for(lambda: delivery(cp, key, status="sent"), timeout=60, what="the alert")
        assert sent["attempts"] >= 3
        after = receiver.received[before:]
        assert [r.body["key"] for r in after] == [key]  # one POST since, and a 2xx
        assert len(cp.get("/api/v1/alerts")["deliveries"]) == 1
    finally:
        cp.stop()


def test_a_killed_agent_is_announced_offline(
    tmp_path: Path, receiver: Receiver, fast_delivery: None
) -> None:
    config = alerts_config(receiver.url, "agent_offline", heartbeat_timeout=3)
    cp = ThreadedControlPlane.start(tmp_path, OffsetClock(), config)
    agent = start_agent(cp, tmp_path, "a1", JOBS)
    try:
        killed_at = time.monotonic()
        agent.popen.kill()
        wait_for(lambda: receiver.bodies("agent_offline"), timeout=60, what="agent_offline")
        (got,) = [r for r in receiver.received if r.body["event"] == "agent_offline"]
        assert got.body["agent"] == "a1" and "no heartbeat for" in got.body["reason"]
        assert got.body["text"].startswith("[fleetrun] oncall: agent a1 is offline")
        assert got.time - killed_at < 3 + 10  # the timeout, then a look every 2 s
        assert [d["event"] for d in cp.get("/api/v1/alerts")["deliveries"]] == ["agent_offline"]
    finally:
        agent.stop()
        cp.stop()


def test_a_failing_sensor_is_announced_once_per_streak(
    tmp_path: Path, receiver: Receiver, fast_delivery: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    monkeypatch.setenv("FLEETRUN_TEST_INBOX", str(inbox))
    cp = ThreadedControlPlane.start(
        tmp_path, OffsetClock(), alerts_config(receiver.url, "tick_failure")
    )
    agent = start_agent(cp, tmp_path, "a1", {"daemon": FIXTURES / "daemon_jobs.py"})

    def ticks() -> list[dict[str, Any]]:
        return cp.get("/api/v1/sensors/inbox/ticks?limit=1000")["ticks"]

    try:
        (inbox / "boom").touch()
        wait_for(lambda: receiver.bodies("tick_failure"), timeout=60, what="a tick_failure")
        wait_for(
            lambda: sum(t["status"] == "FAILURE" for t in ticks()) >= 4, what="more failed ticks"
        )
        (inbox / "boom").unlink()
        wait_for(lambda: ticks()[0]["status"] == "SKIPPED", what="a good tick")
        (inbox / "boom").touch()
        wait_for(lambda: len(receiver.bodies("tick_failure")) == 2, timeout=60, what="the 2nd")
        first, second = receiver.bodies("tick_failure")
        assert first["instigator"] == "inbox" and first["instigator_kind"] == "sensor"
        assert "the inbox sensor blew up" in first["reason"]
        assert first["tick_id"] < second["tick_id"]
        (inbox / "boom").unlink()
        wait_for(lambda: ticks()[0]["status"] == "SKIPPED", what="a good tick again")
        assert len(receiver.bodies("tick_failure")) == 2
    finally:
        agent.stop()
        cp.stop()
