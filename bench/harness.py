"""What every benchmark needs: a real fleet on loopback, HTTP helpers, process readings.

A `Fleet` is a `fleetrun serve` subprocess on an embedded SQLite file (or a PostgreSQL
URL) in a temporary folder plus `fleetrun agent` subprocesses, so figures include the
real HTTP, msgpack and storage paths. Process readings come from /proc (Linux), the
same numbers `ps` shows, so the bench needs nothing installed.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FLEETRUN = [sys.executable, "-m", "control_plane.cli"]
EXAMPLES = REPO / "examples" / "demo_jobs.py"
JOBS = Path(__file__).resolve().parent / "jobs.py"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


OPEN_FILES = 65536  # 10,000 agents hold 20,000 connections to one control plane


def _die_with_parent() -> None:
    """In a child, before exec: the kernel kills it when the bench dies, however it dies
    (an interrupted bench must not leave load behind to skew the next one). It may also
    open `OPEN_FILES` files where the bench may allow it (root), as an operator's
    LimitNOFILE would: the control plane under 10,000 agents needs more than 20,000."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < OPEN_FILES:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
        except (ValueError, OSError):
            return


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    """A bench subprocess, tied to this process's life."""
    return subprocess.Popen(argv, preexec_fn=_die_with_parent, **kwargs)


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def post(url: str, body: dict) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def wait(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def chain_step_ms(url: str, job: str, executor: str, steps: int) -> float:
    """One run of the chain `job` under `executor`: milliseconds per step, from the
    worker's RUN_START to its RUN_SUCCESS (both stamped by the worker)."""
    run_id = post(f"{url}/api/v1/runs", {"job": job, "config": {"execution": executor}})["run_id"]

    def ended() -> dict | None:
        run = get(f"{url}/api/v1/runs/{run_id}")
        return run if run["end_time"] else None

    run = wait(ended, 300, f"the chain {job}")
    assert run["status"] == "SUCCESS", run
    events = get(f"{url}/api/v1/runs/{run_id}/events?limit=1000")["events"]
    times = {e["type"]: ts(e["time"]) for e in events}
    return (times["RUN_SUCCESS"] - times["RUN_START"]) * 1000 / steps


def metric(url: str, series: str) -> float:
    """One series' value on the control plane's /metrics (`series` as printed there,
    labels included); 0 when it has not been counted yet."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as resp:
        for line in resp.read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == series:
                return float(value)
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    """Direct children of a process (its fork server, say)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(c) for c in text)
    return found


@dataclass
class ProcInfo:
    ppid: int
    sid: int
    state: str


def process_table() -> dict[int, ProcInfo]:
    """Every process's parent, session and state from /proc (processes may vanish mid-read)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2 :].split()
        table[int(entry)] = ProcInfo(int(fields[1]), int(fields[3]), fields[0])
    return table


def descendants(root: int, table: dict[int, ProcInfo]) -> list[int]:
    """Every process below `root` in `table`: children, their children, and so on."""
    by_parent: dict[int, list[int]] = defaultdict(list)
    for pid, info in table.items():
        by_parent[info.ppid].append(pid)
    found, todo = [], [root]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextmanager
def fleet(control_plane_toml: str, agents: int, slots: int) -> Iterator[str]:
    """A fleet as a context manager that yields only its URL."""
    with Fleet(control_plane_toml) as running:
        if agents:
            running.add_agents(agents, slots)
        yield running.url


class Fleet:
    """A control plane and its agents as subprocesses; `stop()` ends them all."""

    def __init__(
        self,
        control_plane_toml: str = "",
        storage_url: str = "sqlite:///b.db",
        fresh_schema: bool = True,
    ) -> None:
        """`fresh_schema=False`: serve a PostgreSQL URL as given (a database built
        beforehand, bench/bigdata.py), not a new empty schema on it."""
        self.folder = Path(tempfile.mkdtemp(prefix="fleetrun-bench-"))
        self._schema: tuple[str, str] | None = None
        if fresh_schema and storage_url.startswith(("postgresql:", "postgres:")):
            storage_url = self._fresh_schema(storage_url)
        (self.folder / "cp.toml").write_text(
            f'[server]\nport = 0\n[storage]\nurl = "{storage_url}"\n{control_plane_toml}'
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.agents: list[subprocess.Popen[bytes]] = []
        self.replicas = 0
        self.url: str = self._serve("cp.log")
        self.control_plane = self.procs[0]

    def _serve(self, log_name: str) -> str:
        """Start a `fleetrun serve` on this fleet's config; its URL once it listens."""
        log = self.folder / log_name
        with open(log, "wb") as out:
            self.procs.append(
                spawn(
                    [*FLEETRUN, "serve", "--config", str(self.folder / "cp.toml")],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        try:
            match = wait(
                lambda: re.search(r"listening on (http://\S+)", log.read_text()),
                60,
                "the control plane",
                0.02,
            )
        except BaseException:
            self.stop()
            raise
        return str(match.group(1))

    def add_replica(self) -> str:
        """Another control plane on the same database (PostgreSQL); its URL."""
        self.replicas += 1
        return self._serve(f"cp-replica{self.replicas}.log")

    def add_agents(
        self,
        count: int,
        slots: int,
        location: Path = EXAMPLES,
        extra_toml: str = "",
        command: list[str] | None = None,
        url: str | None = None,
    ) -> None:
        """Start `count` agents serving `location`, polling `url` (default: the first
        control plane), and wait until all have described it."""
        first = len(self.agents)
        for i in range(first, first + count):
            path = self.folder / f"agent{i}.toml"
            path.write_text(
                f'control_plane_url = "{url or self.url}"\nname = "bench{i}"\n'
                f'max_concurrent_runs = {slots}\nstate_dir = "{self.folder}/state{i}"\n'
                f'{extra_toml}[[code_locations]]\nname = "bench"\npython_file = "{location}"\n'
            )
            argv = [*(command or [*FLEETRUN, "agent"]), "--config", str(path)]
            agent = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.agents.append(agent)
            self.procs.append(agent)
        want = len(self.agents)
        wait(
            lambda: (
                len(
                    [
                        a
                        for a in get(f"{self.url}/api/v1/agents")["agents"]
                        if a["code_locations"] and a["status"] == "ONLINE"
                    ]
                )
                >= want
            ),
            60,
            f"{want} agents",
            0.02,
        )

    def _fresh_schema(self, url: str) -> str:
        """Every workload starts from an empty instance: a schema of its own on the
        server (psql, the server's own client), dropped by `stop()`."""
        schema = f"fleetrun_bench_{os.getpid()}_{time.monotonic_ns()}"
        server = url.split("?", 1)[0]
        subprocess.run(["psql", "-q", server, "-c", f"CREATE SCHEMA {schema}"], check=True)
        self._schema = (server, schema)
        return f"{url}{'&' if '?' in url else '?'}search_path={schema}"

    def stop(self) -> None:
        try:
            self._stop_processes()
        finally:
            if self._schema is not None:
                server, schema = self._schema
                drop = f"SET client_min_messages = warning; DROP SCHEMA {schema} CASCADE"
                subprocess.run(["psql", "-q", server, "-c", drop], check=False)
                self._schema = None

    def _stop_processes(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(20)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
