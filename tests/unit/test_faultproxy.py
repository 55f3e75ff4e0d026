"""The fault proxy does what the partition tests rely on: forward, hold, cut, heal.

An echo server stands in for the control plane; plain blocking sockets with timeouts
stand in for the agent.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultproxy import FaultProxy


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(ConnectionResetError):  # the proxy's reset() cuts it
            while data := self.request.recv(65536):
                self.request.sendall(data)


class EchoThenIdleClose(socketserver.BaseRequestHandler):
    """Like a keep-alive timeout: closes a connection idle for 0.5 s."""

    def handle(self) -> None:
        self.request.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


@contextlib.contextmanager
def proxied(handler: type[socketserver.BaseRequestHandler]) -> Iterator[FaultProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fault = FaultProxy("127.0.0.1", server.server_address[1]).start()
    try:
        yield fault
    finally:
        fault.stop()
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    with proxied(Echo) as fault:
        yield fault


def connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((proxy.host, proxy.port), timeout=timeout)


def echo(sock: socket.socket, data: bytes = b"ping") -> bytes:
    sock.sendall(data)
    return sock.recv(100)


def test_pass_through_and_latency(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert echo(sock) == b"ping"
        proxy.latency(0.2)
        started = time.monotonic()
        assert echo(sock) == b"ping"
        assert time.monotonic() - started >= 0.4  # 0.2 s each way
    assert proxy.accepted == 1


def test_blackhole_holds_everything_until_heal(proxy: FaultProxy) -> None:
    with connect(proxy) as sock:
        assert echo(sock) == b"ping"
        proxy.blackhole()
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # the peer learns only from its own timeout
            echo(sock, b"held")
        late = connect(proxy)  # new connections are accepted, and held too
        late.settimeout(0.5)
        with pytest.raises(TimeoutError):
            echo(late, b"late")
        proxy.heal()
        sock.settimeout(5)
        late.settimeout(5)
        assert sock.recv(100) == b"held"  # what waited flows on heal, as TCP would
        assert late.recv(100) == b"late"
        late.close()


def test_blackhole_holds_a_close_too() -> None:
    with proxied(EchoThenIdleClose) as proxy, connect(proxy) as sock:
        assert echo(sock) == b"ping"
        proxy.blackhole()
        time.sleep(1.0)  # the server closes its idle side meanwhile
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # its FIN does not cross the partition
            sock.recv(100)
        proxy.heal()
        sock.settimeout(5)
        assert sock.recv(100) == b""


def test_reset_cuts_connections_and_refuses_new_ones(proxy: FaultProxy) -> None:
    port = proxy.port
    with connect(proxy) as sock:
        assert echo(sock) == b"ping"
        proxy.reset()
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            echo(sock)
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
    proxy.heal()
    assert proxy.port == port  # the agent's URL stays valid
    with connect(proxy) as sock:
        assert echo(sock) == b"ping"


def test_stop_closes_connections(proxy: FaultProxy) -> None:
    sock = connect(proxy)
    assert echo(sock) == b"ping"
    proxy.blackhole()
    proxy.stop()
    sock.settimeout(5)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        echo(sock)
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy)
