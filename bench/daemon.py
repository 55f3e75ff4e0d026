"""The daemon: schedule tick lag, and sensor evaluations per second.

1. Tick lag: an every-minute schedule; a control plane in this process with its clock
   shifted to just before each minute boundary (so 20 ticks take seconds, not 20
   minutes); lag = the tick's start (and its run's creation) - the scheduled time.
2. 1,000 sensors with 1 s intervals (bench/many_sensors.py) on one control plane and
   one agent: evaluations/s over 30 s, and the control plane's and agent's CPU.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import FLEETRUN
from bench.harness import get as _get
from bench.harness import pct as _pct
from bench.harness import post as _post
from bench.harness import ts as _ts
from bench.harness import wait as _wait
from control_plane.config import load_control_plane_config
from control_plane.http.app import serve
from tests.clocks import OffsetClock

DAEMON_JOBS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "daemon_jobs.py"
SENSORS = Path(__file__).resolve().parent / "many_sensors.py"


def _control_plane(
    folder: Path, clock: OffsetClock
) -> tuple[str, asyncio.AbstractEventLoop, asyncio.Task]:
    (folder / "cp.toml").write_text(
        '[server]\nport = 0\n[storage]\nurl = "sqlite:///b.db"\n'
        "[run_monitoring]\nagent_heartbeat_timeout_seconds = 3600\n"  # the clock jumps
    )
    config = load_control_plane_config(str(folder / "cp.toml"))
    ready: dict[str, object] = {}
    event = threading.Event()

    def on_ready(url: str) -> None:
        ready.update(url=url)
        event.set()

    def run() -> None:
        loop = asyncio.new_event_loop()
        task = loop.create_task(serve(config, on_ready, clock))
        ready.update(loop=loop, task=task)
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass

    threading.Thread(target=run, daemon=True).start()
    event.wait(30)
    return ready["url"], ready["loop"], ready["task"]  # type: ignore[return-value]


def _agent(folder: Path, url: str, location: Path, name: str) -> subprocess.Popen[bytes]:
    config = folder / f"{name}.toml"
    config.write_text(
        f'control_plane_url = "{url}"\nname = "{name}"\n[[code_locations]]\n'
        f'name = "bench"\npython_file = "{location}"\n'
    )
    return subprocess.Popen(
        [*FLEETRUN, "agent", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def tick_lag(ticks: int) -> tuple[list[float], list[float]]:
    folder = Path(tempfile.mkdtemp(prefix="fleetrun-bench-daemon-"))
    inbox = folder / "inbox"
    inbox.mkdir()
    os.environ["FLEETRUN_TEST_INBOX"] = str(inbox)
    clock = OffsetClock()
    url, loop, task = _control_plane(folder, clock)
    agent = _agent(folder, url, DAEMON_JOBS, "ticker")
    started, created = [], []
    try:
        _wait(
            lambda: any(a["code_locations"] for a in _get(f"{url}/api/v1/agents")["agents"]),
            60,
            "the agent",
        )
        _post(f"{url}/api/v1/sensors/inbox/stop", {})

        def finished(count: int) -> list[dict] | None:
            found = _get(f"{url}/api/v1/schedules/every_minute/ticks?limit=1000")["ticks"]
            done = [t for t in found if t["status"] != "STARTED"]
            return done if len(done) >= count else None

        for seen in range(1, ticks + 1):
            clock.offset += (60 - clock.time() % 60) - 0.5  # half a second before a tick
            # The jump is not something the scheduler could have slept towards: wake it
            # (starting it again ticks from now) so it sleeps until the tick in real time.
            _post(f"{url}/api/v1/schedules/every_minute/start", {})
            done = _wait(functools.partial(finished, seen), 60, "the tick")
            tick = done[0]
            run = _get(f"{url}/api/v1/runs/{tick['run_ids'][0]}")
            scheduled = _ts(tick["scheduled_time"])
            started.append(_ts(tick["start_time"]) - scheduled)
            created.append(_ts(run["create_time"]) - scheduled)
    finally:
        agent.terminate()
        agent.wait(30)
        loop.call_soon_threadsafe(task.cancel)
    return started, created


def _cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children, and its live children (one level:
    the agent's fork server, which reaps the run workers)."""
    total = 0.0
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            own, rest = path.read_text().split(" (", 1)
        except OSError:
            continue
        fields = rest.rsplit(")", 1)[1].split()
        if int(own) == pid or int(fields[1]) == pid:
            total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


def sensors(seconds: float = 30.0) -> tuple[float, float, float]:
    """Evaluations/s, control-plane CPU seconds/s, agent (+ workers) CPU seconds/s."""
    folder = Path(tempfile.mkdtemp(prefix="fleetrun-bench-sensors-"))
    (folder / "cp.toml").write_text('[server]\nport = 0\n[storage]\nurl = "sqlite:///b.db"\n')
    log = open(folder / "cp.log", "wb")
    cp = subprocess.Popen(
        [*FLEETRUN, "serve", "--config", str(folder / "cp.toml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    agent = None
    try:
        match = _wait(
            lambda: re.search(r"listening on (http://\S+)", (folder / "cp.log").read_text()),
            60,
            "cp",
        )
        url = match.group(1)
        agent = _agent(folder, url, SENSORS, "sensors")
        _wait(
            lambda: any(a["code_locations"] for a in _get(f"{url}/api/v1/agents")["agents"]),
            120,
            "the agent",
        )

        def count() -> int:
            return (
                sum(
                    len(_get(f"{url}/api/v1/sensors/sensor_{i}/ticks?limit=1000")["ticks"])
                    for i in range(0, 1000, 50)
                )
                * 50
            )

        time.sleep(5)  # warm up: the first evaluations start
        before, cp0, t0 = count(), _cpu(cp.pid), time.monotonic()
        agent0 = _cpu(agent.pid)
        time.sleep(seconds)
        after, cp1, t1 = count(), _cpu(cp.pid), time.monotonic()
        agent1 = _cpu(agent.pid)
        return (after - before) / (t1 - t0), (cp1 - cp0) / (t1 - t0), (agent1 - agent0) / (t1 - t0)
    finally:
        for proc in (agent, cp):
            if proc is not None:
                proc.terminate()
                proc.wait(30)


def report(ticks: int = 20, sensor_seconds: float = 30.0) -> None:
    started, created = tick_lag(ticks)
    print(f"schedule tick lag, every-minute schedule, {ticks} ticks (ms)")
    print(f"  {'measure':<28}{'p50':>8}{'p99':>8}{'max':>8}")
    for name, values in (
        ("scheduled -> tick started", started),
        ("scheduled -> run created", created),
    ):
        ms = [v * 1000 for v in values]
        print(f"  {name:<28}{statistics.median(ms):>8.1f}{_pct(ms, 0.99):>8.1f}{max(ms):>8.1f}")
    rate, cp_cpu, agent_cpu = sensors(sensor_seconds)
    print(f"1,000 sensors at 1 s intervals, one agent, {sensor_seconds:g} s")
    print(
        f"  {rate:.0f} evaluations/s; control plane CPU {cp_cpu * 100:.0f}%, agent and "
        f"workers CPU {agent_cpu * 100:.0f}% (of one core)"
    )
