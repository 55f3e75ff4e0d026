"""A round-robin TCP load balancer in front of several control-plane replicas.

What the replica tests put between agents (or users) and the replicas, as HAProxy in
`mode tcp` would be: each new connection goes to the next replica that accepts it, so
one agent's poll, heartbeat and event connections may land on different replicas, and
when a replica dies its clients' reconnections go to the others. It runs its own asyncio
loop in a background thread on a free loopback port; every wait inside is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading

CONNECT_TIMEOUT = 2.0
IDLE_TIMEOUT = 300.0


class LoadBalancer:
    def __init__(self, upstreams: list[tuple[str, int]], host: str = "127.0.0.1") -> None:
        self.upstreams = upstreams
        self.host = host
        self.port = 0
        self.connections: dict[tuple[str, int], int] = dict.fromkeys(upstreams, 0)
        self._next = itertools.cycle(range(len(upstreams)))
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> LoadBalancer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        first = next(self._next)
        for i in range(len(self.upstreams)):
            upstream = self.upstreams[(first + i) % len(self.upstreams)]
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    pair = await asyncio.open_connection(*upstream)
            except (OSError, TimeoutError):
                continue  # that replica is down: the next one
            self.connections[upstream] += 1
            return pair
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await self._connect()
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, TimeoutError):
                while True:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        data = await src.read(65536)
                    if not data:
                        break
                    dst.write(data)
                    async with asyncio.timeout(30):
                        await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
