"""Shared fixtures: a real control plane and real agents as subprocesses on loopback."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from aiohttp import web

from control_plane.clock import Clock, SystemClock
from control_plane.config import ControlPlaneConfig, load_control_plane_config
from control_plane.http.app import build_app, serve
from control_plane.storage import open_storage
from tests.clocks import OffsetClock

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "demo_jobs.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
FLEETRUN = [sys.executable, "-m", "control_plane.cli"]
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def app_for(config: ControlPlaneConfig, clock: Clock | None = None) -> web.Application:
    """A control-plane app (not yet started) on the storage its config names."""
    storage = open_storage(
        config.storage.url, config.storage.pool_size, config.compute_logs.store()
    )
    return build_app(config, storage, clock or SystemClock())


def wait_for(
    check: Callable[[], T | Literal[False] | None],
    timeout: float = 60.0,
    interval: float = 0.05,
    what: str = "",
) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or check}: {last!r}")


def http(
    method: str,
    url: str,
    body: Any = None,
    raw: bytes | None = None,
    token: str | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@dataclass
class Proc:
    popen: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def start_process(args: list[str], log_path: Path, cwd: Path | None = None) -> Proc:
    log_file = open(log_path, "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    popen = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    log_file.close()
    return Proc(popen, log_path)


@dataclass
class ControlPlaneProc(Proc):
    url: str = ""
    token: str | None = None  # a user token, when auth is on
    context: ssl.SSLContext | None = None  # trusts the test CA, when TLS is on

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return http(method, self.url + path, body, token=self.token, context=self.context)

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        assert status == 200, (status, body)
        return body

    def submit(self, job: str, **fields: Any) -> str:
        status, body = self.call("POST", "/api/v1/runs", {"job": job, **fields})
        assert status == 201, (status, body)
        return body["run_id"]

    def wait_run(self, run_id: str, timeout: float = 90.0) -> dict:
        def done() -> dict | None:
            run = self.get(f"/api/v1/runs/{run_id}")
            return run if run["status"] in TERMINAL else None

        return wait_for(done, timeout, what=f"run {run_id} to finish")

    def events(self, run_id: str) -> list[dict]:
        return self.get(f"/api/v1/runs/{run_id}/events")["events"]


@dataclass
class ThreadedControlPlane(ControlPlaneProc):
    """`fleetrun serve` in a thread, with an `OffsetClock` the test can move."""

    clock: OffsetClock | None = None
    loop: asyncio.AbstractEventLoop | None = None
    task: asyncio.Task | None = None
    thread: threading.Thread | None = None

    @classmethod
    def start(cls, folder: Path, clock: OffsetClock, extra: str = "") -> ThreadedControlPlane:
        config = load_control_plane_config(str(write_control_plane_config(folder, extra)))
        cp = cls(popen=None, log_path=folder / "none.log", clock=clock)  # type: ignore[arg-type]
        ready = threading.Event()

        def on_ready(url: str) -> None:
            cp.url = url
            ready.set()

        def run() -> None:
            cp.loop = asyncio.new_event_loop()
            cp.task = cp.loop.create_task(serve(config, on_ready, clock))
            try:
                cp.loop.run_until_complete(cp.task)
            except asyncio.CancelledError:
                pass
            finally:
                cp.loop.close()

        cp.thread = threading.Thread(target=run, daemon=True)
        cp.thread.start()
        assert ready.wait(30), "the control plane did not start"
        return cp

    def stop(self) -> int:
        if self.loop is not None and self.task is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.task.cancel)
        if self.thread is not None:
            self.thread.join(30)
        return 0


def write_control_plane_config(
    folder: Path,
    extra: str = "",
    port: int = 0,
    server_extra: str = "",
    storage_url: str = "sqlite:///fleetrun.db",
) -> Path:
    path = folder / "control-plane.toml"
    path.write_text(
        f'[server]\nport = {port}\n{server_extra}\n\n[storage]\nurl = "{storage_url}"\n' + extra
    )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_control_plane(
    folder: Path,
    extra_config: str = "",
    port: int = 0,
    server_extra: str = "",
    token: str | None = None,
    context: ssl.SSLContext | None = None,
    extra_args: tuple[str, ...] = (),
    storage_url: str = "sqlite:///fleetrun.db",
) -> ControlPlaneProc:
    config = write_control_plane_config(folder, extra_config, port, server_extra, storage_url)
    proc = start_process(
        [*FLEETRUN, "serve", "--config", str(config), *extra_args], folder / "control-plane.log"
    )

    def listening() -> re.Match[str] | None:
        assert proc.popen.poll() is None, f"control plane exited early:\n{proc.log()}"
        return re.search(r"listening on (https?://\S+)", proc.log())

    match = wait_for(listening, what="control plane to listen")
    return ControlPlaneProc(proc.popen, proc.log_path, match.group(1), token, context)


def write_agent_config(
    folder: Path,
    url: str,
    name: str,
    locations: dict[str, Path],
    extra: str = "",
    location_extra: str = "",
) -> Path:
    path = folder / f"{name}.toml"
    text = f'control_plane_url = "{url}"\nname = "{name}"\n{extra}\n'
    for loc_name, file in locations.items():
        text += f'\n[[code_locations]]\nname = "{loc_name}"\npython_file = "{file}"\n'
        text += location_extra
    path.write_text(text)
    return path


def start_agent(
    cp: ControlPlaneProc,
    folder: Path,
    name: str = "agent-1",
    locations: dict[str, Path] | None = None,
    extra: str = "",
    extra_args: tuple[str, ...] = (),
    url: str | None = None,  # e.g. a fault proxy's, in front of `cp`
    location_extra: str = "",  # more keys for every [[code_locations]] table
) -> Proc:
    locations = {"examples": EXAMPLES} if locations is None else locations
    config = write_agent_config(folder, url or cp.url, name, locations, extra, location_extra)
    proc = start_process(
        [*FLEETRUN, "agent", "--config", str(config), *extra_args], folder / f"{name}.log"
    )

    def registered() -> bool:
        assert proc.popen.poll() is None, f"agent exited early:\n{proc.log()}"
        agents = cp.get("/api/v1/agents")["agents"]
        return any(
            a["name"] == name
            and a["status"] == "ONLINE"
            and len(a["code_locations"]) >= len(locations)
            for a in agents
        )

    wait_for(registered, what=f"agent {name} to register")
    return proc


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlaneProc]:
    cp = start_control_plane(tmp_path)
    yield cp
    cp.stop()


@pytest.fixture
def agent(control_plane: ControlPlaneProc, tmp_path: Path) -> Iterator[Proc]:
    proc = start_agent(control_plane, tmp_path)
    yield proc
    proc.stop()


POSTGRES_URL = os.environ.get(
    "FLEETRUN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
POSTGRES_HELP = (
    "the PostgreSQL tests need a server at {url} (set FLEETRUN_TEST_POSTGRES_URL for "
    "another): start one with `pg_ctlcluster --skip-systemctl-redirect $(ls "
    "/etc/postgresql) main start` (`make test` does, as root), or `apt-get install postgresql`"
)


def _psql(sql: str) -> None:
    """Run one statement on the test server."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(POSTGRES_URL, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:  # a thread of its own: the caller may be inside an event loop
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result()
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"{POSTGRES_HELP.format(url=POSTGRES_URL)} ({exc})", pytrace=False)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A storage URL on the test server with a schema of its own, dropped afterwards."""
    schema = f"fleetrun_test_{os.getpid()}_{time.monotonic_ns()}"
    _psql(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{sep}search_path={schema}"
    _psql(f"DROP SCHEMA {schema} CASCADE")
