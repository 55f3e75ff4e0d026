"""A TCP proxy the fault tests put between an agent and the control plane.

This kernel has no netem, and nft rules would cut every agent on loopback at once, so
one agent's link is cut here instead, in user space. The proxy runs its own asyncio
loop in a background thread, listens on a free loopback port and forwards to the
control plane. Modes:

- pass-through (the default, and what `heal()` returns to);
- `blackhole()`: connections are accepted and kept, but nothing is forwarded either
  way, so the peers learn only from their own timeouts (a half-open TCP partition).
  Bytes already sent wait in socket buffers and flow on `heal()`, as TCP segments
  retransmitted after an nft `drop` rule is removed would;
- `reset()`: every connection is closed with RST at once and the port stops
  listening, so new connections are refused (RST to the SYN);
- `latency(seconds)`: added to every chunk, in both directions.

Every wait inside is bounded (connect, drain and idle timeouts) and `stop()` closes
everything within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CONNECT_TIMEOUT = 10.0  # to the control plane, once the link is up
DRAIN_TIMEOUT = 30.0  # a peer that stops reading for this long is cut
IDLE_TIMEOUT = 300.0  # a connection with no traffic for this long is closed
CONTROL_TIMEOUT = 10.0  # a mode change or stop, from the test's thread


def _rst_on_close(writer: asyncio.StreamWriter) -> None:
    """SO_LINGER 0: closing the socket sends RST, not FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    """One proxied link: `url` for the agent, `blackhole()`/`reset()`/`heal()` for the test."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = 0
        self.mode = "pass"
        self.delay = 0.0
        self.accepted = 0  # connections accepted, for the test's report
        self.forwarded_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None  # cleared while blackholed
        self._conns: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- control, from the test's thread ----------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        assert ready.wait(CONTROL_TIMEOUT), "the proxy's loop did not start"
        self._call(self._open())
        return self

    def blackhole(self) -> None:
        """Partition: keep every connection, forward nothing until `heal()`."""
        self._call(self._set_mode("blackhole"))

    def reset(self) -> None:
        """Partition: RST every connection, refuse new ones until `heal()`."""
        self._call(self._set_mode("reset"))

    def heal(self) -> None:
        """Back to pass-through (keeping any added latency)."""
        self._call(self._set_mode("pass"))

    def latency(self, seconds: float) -> None:
        """Delay every chunk by `seconds`, in both directions (0: none)."""
        self.delay = seconds

    def stop(self) -> None:
        if self._loop is None or self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(CONTROL_TIMEOUT)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None, "start the proxy first"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    # --- inside the proxy's loop ------------------------------------------------------

    async def _open(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        """Stop listening (new connections get RST), then drop every connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self._abort_all()
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CONTROL_TIMEOUT):
                    await server.wait_closed()

    async def _set_mode(self, mode: str) -> None:
        assert self._flowing is not None
        previous, self.mode = self.mode, mode
        if mode == "blackhole":
            self._flowing.clear()
        elif mode == "reset":
            await self._unlisten()
        else:
            if previous == "reset":
                await self._listen()
            self._flowing.set()

    async def _abort_all(self) -> None:
        """Close every connection with RST, both sides, and wait for their tasks."""
        for task, writers in list(self._conns.items()):
            for writer in writers:
                _rst_on_close(writer)
                writer.transport.abort()
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=CONTROL_TIMEOUT)

    async def _close(self) -> None:
        await self._unlisten()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":  # accepted just before the listener closed
            _rst_on_close(writer)
            writer.transport.abort()
            return
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        writers = [writer]  # and the upstream side, once connected
        self._conns[task] = writers
        try:
            await self._serve(reader, writers)
        except (OSError, TimeoutError, asyncio.CancelledError):
            for w in writers:  # a broken or cut link: no graceful close
                w.transport.abort()
        finally:
            self._conns.pop(task, None)
            for w in writers:
                w.close()

    async def _serve(
        self, reader: asyncio.StreamReader, writers: list[asyncio.StreamWriter]
    ) -> None:
        assert self._flowing is not None
        await self._flowing.wait()  # blackholed: the "SYN" reaches the far side on heal
        async with asyncio.timeout(CONNECT_TIMEOUT):
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        writers.append(up_writer)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writers[0])),
        ]
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            for pump in done:
                pump.result()  # a reset or timeout on either side cuts both
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy one direction until EOF; read nothing while blackholed."""
        assert self._flowing is not None
        while True:
            await self._flowing.wait()
            async with asyncio.timeout(IDLE_TIMEOUT):  # not wait_for: in 3.11 it can
                data = await src.read(1 << 16)  # swallow a cancel that races a result
            # Blackholed while this read was pending: hold what it got, an EOF included
            # (a peer's FIN must not cross a partition either).
            await self._flowing.wait()
            if not data:
                break
            if self.delay > 0:
                await asyncio.sleep(self.delay)
            await self._flowing.wait()
            dst.write(data)
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await dst.drain()
            self.forwarded_bytes += len(data)
        if dst.can_write_eof():
            with contextlib.suppress(OSError):
                dst.write_eof()
