"""A stand-in control plane on a loopback port, for agent tests that need replies a real
control plane never sends (a launch this agent cannot read, as from another version).

It speaks the agent protocol's real codec over real HTTP (aiohttp, in a thread of its
own): registers any agent, answers polls with the launches the test owes it (encoded as
they are, unchecked), acknowledges every record batch and keeps the records for the
test to read. Everything else an agent sends is answered as the real one would.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from protocol.codec import decode_any, encode
from protocol.messages import (
    Drained,
    EvaluationAck,
    EventAck,
    EventBatch,
    HeartbeatReply,
    LaunchRun,
    Poll,
    PollReply,
    Register,
    Registered,
    RunRecord,
)
from tests.conftest import FLEETRUN, Proc, start_process, write_agent_config


class FakeControlPlane:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.url = ""
        self.records: dict[str, list[RunRecord]] = {}
        self._owed: list[LaunchRun] = []
        self._polls_after_launch = 0
        self._lock = threading.Lock()

    def launch(self, run_id: str, lease: int, job: str, config: dict[str, Any]) -> LaunchRun:
        return LaunchRun(run_id=run_id, job=job, location="hardening", lease=lease, config=config)

    def owe(self, *launches: LaunchRun) -> None:
        with self._lock:
            self._owed.extend(launches)

    def record_of(self, run_id: str, event_type: str) -> RunRecord | None:
        with self._lock:
            return next((r for r in self.records.get(run_id, []) if r.type == event_type), None)

    def polls_after_launch(self) -> int:
        return self._polls_after_launch

    def start_agent(self, name: str, locations: dict[str, Path]) -> Proc:
        config = write_agent_config(self.folder, self.url, name, locations)
        return start_process(
            [*FLEETRUN, "agent", "--config", str(config)], self.folder / f"{name}.log"
        )

    async def _handle(self, request: web.Request) -> web.Response:
        message = decode_any(await request.read())
        reply: Any
        if isinstance(message, Register):
            reply = Registered(
                "fake-agent",
                heartbeat_interval_seconds=1.0,
                poll_timeout_seconds=1.0,
                heartbeat_timeout_seconds=30.0,
            )
        elif isinstance(message, Poll):
            with self._lock:
                owed, self._owed = self._owed, []
                if not owed and message.held_leases:
                    self._polls_after_launch += 1
            if not owed:
                await asyncio.sleep(0.2)
            reply = PollReply(launches=owed)
        elif isinstance(message, EventBatch):
            with self._lock:
                self.records.setdefault(message.run_id, []).extend(message.records)
            reply = EventAck(acked_seq=max((r.seq for r in message.records), default=0))
        elif type(message).__name__ == "Drain":
            reply = Drained(status="DRAINING")
        elif type(message).__name__ == "EvaluationResult":
            reply = EvaluationAck()
        else:
            reply = HeartbeatReply()
        return web.Response(body=encode(reply), content_type="application/msgpack")

    @contextlib.contextmanager
    def running(self) -> Iterator[FakeControlPlane]:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/agent/v1/{path}", self._handle)
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app)
        ready = threading.Event()

        async def start() -> None:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            ready.set()

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(start(), loop).result(30)
        assert ready.wait(30)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()
