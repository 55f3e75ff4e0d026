"""`fleetrun demo`: a control plane on a temporary SQLite file, one local agent serving the
example jobs, a few example runs, and their status changes printed as they happen."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

import aiohttp

from control_plane.config import ControlPlaneConfig
from control_plane.http.app import serve
from control_plane.model.statuses import EVENT_STATUS, TERMINAL_STATUSES

DEMO_JOBS = ["hello", "etl", "chatty", "broken"]
AGENT_READY_TIMEOUT_SECONDS = 120.0


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _examples_file() -> str:
    import examples.demo_jobs

    return str(Path(examples.demo_jobs.__file__).resolve())


def _write_agent_config(folder: str, url: str) -> str:
    path = os.path.join(folder, "agent.toml")
    with open(path, "w") as fh:
        fh.write(
            f'control_plane_url = "{url}"\n'
            'name = "demo-agent"\n'
            "max_concurrent_runs = 4\n\n"
            "[[code_locations]]\n"
            'name = "examples"\n'
            f'python_file = "{_examples_file()}"\n'
        )
    return path


def _open_log(path: str) -> BinaryIO:
    return open(path, "wb")


async def _wait_for_jobs(session: aiohttp.ClientSession, url: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + AGENT_READY_TIMEOUT_SECONDS
    while loop.time() < deadline:
        async with session.get(f"{url}/api/v1/jobs") as resp:
            data = await resp.json()
        if {j["name"] for j in data["jobs"]} >= set(DEMO_JOBS):
            return
        for err in data["location_errors"]:
            raise RuntimeError(f"example location failed to load: {err['error']}")
        await asyncio.sleep(0.2)
    raise RuntimeError("the demo agent did not come up in time")


async def _follow(session: aiohttp.ClientSession, url: str, run_id: str, job: str) -> str:
    after = 0
    while True:
        async with session.get(
            f"{url}/api/v1/runs/{run_id}/events", params={"after": after, "wait": 20}
        ) as resp:
            events = (await resp.json())["events"]
        for ev in events:
            after = ev["seq"]
            status = EVENT_STATUS.get(ev["type"])
            if status is not None:
                print(f"  {ev['time'][11:23]}  {job:<7} {run_id[:8]}  {status:<9} {ev['message']}")
            if ev["type"] == "STEP_FAILURE":
                print(
                    f"  {ev['time'][11:23]}  {job:<7} {run_id[:8]}  step {ev['step']}: "
                    f"{ev['message']}"
                )
            if status in TERMINAL_STATUSES:
                return str(status)


async def _demo(port: int, exit_when_done: bool) -> int:
    folder = tempfile.mkdtemp(prefix="fleetrun-demo-")
    config = ControlPlaneConfig()
    if port and not _port_free(config.server.host, port):
        print(f"port {port} is busy; using a free port instead")
        port = 0
    config = config.updated(
        server={"port": port}, storage={"url": f"sqlite:///{folder}/fleetrun.db"}
    )
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(config, on_ready=ready.set_result))
    url = await ready
    agent_config = _write_agent_config(folder, url)
    agent_log = _open_log(os.path.join(folder, "agent.log"))
    agent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent.cli",
        "run",
        "--config",
        agent_config,
        stdout=agent_log,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as session:
            await _wait_for_jobs(session, url)
            print(f"fleetrun demo: control plane at {url}, agent 'demo-agent', files in {folder}")
            print("submitting example runs:", ", ".join(DEMO_JOBS))
            followers = []
            for job in DEMO_JOBS:
                async with session.post(f"{url}/api/v1/runs", json={"job": job}) as resp:
                    run_id = (await resp.json())["run_id"]
                followers.append(_follow(session, url, run_id, job))
            results = await asyncio.gather(*followers)
        print()
        print("finished:", ", ".join(f"{j}={s}" for j, s in zip(DEMO_JOBS, results, strict=True)))
        print(
            f"""
Where to look:
  web UI         {url}/
  API            {url}/api/v1/runs   (also /agents, /jobs, /healthz; {url}/api/v1/openapi.json)
  metrics        {url}/metrics
  CLI            export FLEETRUN_URL={url}
                 .venv/bin/fleetrun runs list
                 .venv/bin/fleetrun runs show RUN_ID
                 .venv/bin/fleetrun runs logs RUN_ID
                 .venv/bin/fleetrun runs submit etl --wait
  storage        {folder}/fleetrun.db
  agent log      {folder}/agent.log
Serving until Ctrl-C.""",
            flush=True,
        )
        if not exit_when_done:
            await server
        return 0
    finally:
        if agent.returncode is None:
            agent.terminate()
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(agent.wait(), 10)
        agent_log.close()
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


def run_demo(port: int = 8470, exit_when_done: bool = False) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_demo(port, exit_when_done))
    except KeyboardInterrupt:
        print("\nfleetrun demo stopped")
        return 0
    except RuntimeError as exc:
        print(f"fleetrun demo: {exc}", file=sys.stderr)
        return 1
