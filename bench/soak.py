"""Soak test (issue 10): mixed load for a long time with faults injected on a schedule.

`python -m bench.soak [--minutes 30] [--agents 2] [--seed N]` (`make soak`) starts a real
control plane (SQLite in a temporary folder, heartbeat timeout 6 s, run retries and one
worker resume) and N agents serving `bench/soak_jobs.py`, submits runs at a steady rate
across five job kinds, and injects one fault at a time on a seeded random schedule:

- `cp_kill`: kill -9 of the control plane, restarted 0-5 s later on the same port and
  database;
- `agent_kill`: kill -9 of one agent process (its fork server and workers are left to
  fend for themselves, as after a real crash of the agent), restarted after 0-12 s
  (sometimes within the heartbeat timeout, so `agent_restarted`, sometimes past it, so
  `agent_lost`); half of these kill, instead of a random agent at a random moment, the
  agent of the next worker that starts an op, the moment its marker line appears;
- `worker_kill`: kill -9 of one run worker, found among the agent's descendants in /proc
  and matched to a STARTED run by the pid in its RUN_START event;
- `agent_stop_short` / `agent_stop_long`: SIGSTOP of one agent process for less / more
  than the heartbeat timeout, then SIGCONT;
- `cp_stop_short`: SIGSTOP of the control plane for less than the timeout, then SIGCONT.

The last `--quiet` seconds have no faults; then submission stops and the harness waits
(bounded) until no run is active. Every 10 s it samples RSS and open fds of the control
plane, each agent and each agent's fork server (following new pids after restarts), and
the sizes of the SQLite database, its WAL and each agent's spool.

Every op execution appends `run_id lease step time pid` to a marker file (see
`bench/soak_jobs.py`), so executions are counted independently of what the control plane
recorded. The report covers: submissions and their outcome (acked = 201; refused = the
connection was refused, so nothing was created; unknown = the request may have reached the
control plane but no answer came back, later looked up by its `soak/sub` tag); LOST runs
(acked but never terminal); statuses and retry chains; duplicate executions of one step
under one lease; executions after an attempt was fenced; event seq contiguity; memory over
time; and the fault log with detection and recovery times. The exit status is 1 if any
correctness check failed (a lost run, a seq gap, a duplicate, an unexpected process exit),
2 if the harness itself failed, 130 on Ctrl-C; every process it started is stopped either
way (the harness makes itself a child subreaper, so orphaned workers are found too).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import descendants, process_table

REPO = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).resolve().parent / "soak_jobs.py"
FLEETRUN = [sys.executable, "-m", "control_plane.cli"]
TERMINAL = frozenset({"SUCCESS", "FAILURE", "CANCELED"})
ACTIVE = "QUEUED,NOT_STARTED,STARTING,STARTED,CANCELING"
END_EVENTS = frozenset({"RUN_SUCCESS", "RUN_FAILURE", "RUN_CANCELED"})
# Failure kinds the control plane decides on its own (the attempt may still be running).
FENCING_KINDS = frozenset({"agent_lost", "agent_restarted", "start_timeout", "max_runtime"})
MAX_RETRIES = 2
STOP_TAG = "fleetrun/on_lost_contact"
JOB_KINDS: dict[str, tuple[str, float]] = {  # kind -> (job, share of submissions)
    "quick": ("soak_quick", 0.35),
    "chain": ("soak_chain", 0.25),
    "chatty": ("soak_chatty", 0.10),
    "sleep": ("soak_sleep", 0.15),
    "flaky": ("soak_flaky", 0.15),
}
JOB_STEPS = {
    "soak_quick": ["quick_op"],
    "soak_chain": ["chain_a", "chain_b", "chain_c"],
    "soak_chatty": ["chatter"],
    "soak_sleep": ["nap"],
    "soak_flaky": ["flaky_prepare", "flaky_step"],
}
FAULT_KINDS = (
    "cp_kill",
    "agent_kill",
    "worker_kill",
    "agent_stop_short",
    "agent_stop_long",
    "cp_stop_short",
)
# Faults after which no verdict (besides on_lost_contact=stop runs) is expected at all.
HARMLESS_FAULTS = frozenset({"cp_kill", "cp_stop_short", "agent_stop_short"})
RECOVERY_TIMEOUT = 60.0  # bound on each wait for a process to come back


def log(message: str) -> None:
    """Progress lines go to stderr so that stdout holds only the report."""
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _iso(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> float | None:
    """The time `check` first held, or None after `timeout` s; an unreachable API is False."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return time.time()
        except (Unreachable, ApiError):
            pass
        time.sleep(interval)
    return None


# --- HTTP ---------------------------------------------------------------------------------


class Unreachable(Exception):
    """No HTTP answer. `refused`: the connection was refused, so the request did nothing."""

    def __init__(self, message: str, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class ApiError(Exception):
    """An HTTP answer other than the one expected."""


class Api:
    """A tiny JSON client with a timeout on every call: the control plane may be frozen."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")
        except urllib.error.URLError as exc:
            refused = isinstance(exc.reason, ConnectionRefusedError)
            raise Unreachable(str(exc.reason), refused) from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise Unreachable(repr(exc), isinstance(exc, ConnectionRefusedError)) from exc

    def get(self, path: str, timeout: float = 10.0) -> Any:
        status, body = self.call("GET", path, timeout=timeout)
        if status != 200:
            raise ApiError(f"GET {path}: {status} {body!r}"[:500])
        return body

    def ready(self) -> bool:
        return self.call("GET", "/readyz", timeout=2.0)[0] == 200

    def agents(self, timeout: float = 5.0) -> dict[str, dict]:
        return {a["name"]: a for a in self.get("/api/v1/agents", timeout)["agents"]}

    def active_runs(self, agent: str, timeout: float = 5.0) -> list[dict]:
        query = urllib.parse.urlencode({"agent": agent, "status": "STARTING,STARTED"})
        return self.get(f"/api/v1/runs?{query}&limit=1000", timeout)["runs"]

    def all_events(self, run_id: str) -> list[dict]:
        events: list[dict] = []
        for _ in range(1000):  # bounded: 1,000,000 events per run is far beyond any soak run
            after = events[-1]["seq"] if events else 0
            page = self.get(f"/api/v1/runs/{run_id}/events?after={after}&limit=1000", 30)
            events += page["events"]
            if len(page["events"]) < 1000:
                break
        return events

    def all_runs(self, query: str = "") -> list[dict]:
        runs: list[dict] = []
        cursor = ""
        for _ in range(10_000):
            suffix = f"&cursor={cursor}" if cursor else ""
            page = self.get(f"/api/v1/runs?limit=1000{query}{suffix}", 30)
            runs += page["runs"]
            cursor = page.get("next_cursor") or ""
            if not cursor:
                break
        return runs


# --- processes ----------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def become_subreaper() -> bool:
    """Orphans of a killed agent (fork server, workers) then re-parent to us, to be cleaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def watch_and_kill(marker: str, agent_pids: str, timeout: float) -> None:
    """Helper process of `Faults._kill_at_op_start`: tail the marker file; the first line
    written by a worker of one of `agent_pids` (worker -> fork server -> agent, by ppid)
    gets that agent SIGKILLed at once; prints `killed AGENT TIME RUN LEASE STEP TIME PID`."""
    agents = {int(p) for p in agent_pids.split(",")}
    path = Path(marker)
    offset = file_size(path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        size = file_size(path)
        if size <= offset:
            time.sleep(0.0002)
            continue
        with open(path, "rb") as markers:
            markers.seek(offset)
            chunk = markers.read(size - offset).decode(errors="replace")
        offset = size
        for line in chunk.splitlines():
            parts = line.split()
            if len(parts) != 5 or not parts[4].isdigit():
                continue
            pid = int(parts[4])
            for _ in range(3):
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    break
                pid = int(stat[stat.rindex(")") + 2 :].split()[1])
                if pid in agents:
                    os.kill(pid, signal.SIGKILL)
                    print(f"killed {pid} {time.time():.6f} {line}", flush=True)
                    return
    print("timeout", flush=True)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class Managed:
    """One long-lived process the harness starts, kills and restarts (one log across lives)."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.expected_down = False  # set by a fault, so an exit is not reported as a crash

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== soak: {self.name} start #{self.generation + 1}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.args,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # Ctrl-C reaches the harness only; it cleans up
            )
        self.generation += 1

    @property
    def pid(self) -> int | None:
        if self.popen is None or self.popen.poll() is not None:
            return None
        return self.popen.pid

    def signal(self, sig: int) -> bool:
        pid = self.pid
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            return True
        return False

    def kill9(self) -> None:
        if self.signal(signal.SIGKILL) and self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Fleet:
    """The control plane and agents of one soak run, with their configs in `folder`."""

    def __init__(
        self, folder: Path, agents: int, timeout: float, slots: int, resume: int, retention: float
    ) -> None:
        self.folder = folder
        self.timeout = timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = Api(self.url)
        self.lock = threading.RLock()
        self.popen_pids: set[int] = set()
        self.crashes: list[dict[str, Any]] = []
        self.closed = False  # set by cleanup: a fault in progress must not restart anything
        self.db = folder / "fleetrun.db"
        cp_config = folder / "control-plane.toml"
        cp_config.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\n'
            '[storage]\nurl = "sqlite:///fleetrun.db"\n'
            f"[run_monitoring]\nagent_heartbeat_timeout_seconds = {timeout:g}\n"
            f"max_resume_run_attempts = {resume}\nstart_timeout_seconds = 60\n"
            f"[run_retries]\nmax_retries = {MAX_RETRIES}\n" + retention_table(retention)
        )
        self.cp = Managed(
            "control-plane",
            [*FLEETRUN, "serve", "--config", str(cp_config)],
            folder / "control-plane.log",
        )
        self.agents: list[Managed] = []
        for i in range(agents):
            name = f"soak-{i}"
            path = folder / f"{name}.toml"
            path.write_text(
                f'control_plane_url = "{self.url}"\nname = "{name}"\n'
                f"max_concurrent_runs = {slots}\ndrain_timeout_seconds = 5\n"
                f'[[code_locations]]\nname = "soak"\npython_file = "{JOBS}"\n'
            )
            self.agents.append(
                Managed(name, [*FLEETRUN, "agent", "--config", str(path)], folder / f"{name}.log")
            )

    @property
    def managed(self) -> list[Managed]:
        return [self.cp, *self.agents]

    def start(self, proc: Managed) -> None:
        with self.lock:
            if self.closed:
                raise RuntimeError(f"not starting {proc.name}: cleaning up")
            proc.start()
            assert proc.popen is not None
            self.popen_pids.add(proc.popen.pid)

    def spool(self, agent: Managed) -> Path:
        return self.folder / "fleetrun-state" / agent.name / "spool.db"

    def agents_back(self, names: list[str], since: float, timeout: float) -> float | None:
        """When every named agent was ONLINE with a heartbeat received after `since`."""

        def back() -> bool:
            agents = self.api.agents(timeout=2.0)
            return all(
                n in agents
                and agents[n]["status"] == "ONLINE"
                and (_iso(agents[n]["last_heartbeat"]) or 0) > since
                for n in names
            )

        return wait_until(back, timeout, 0.1)

    def check_exits(self) -> None:
        """A process that exited without a fault killing it is a crash: record it, restart it."""
        with self.lock:
            for proc in self.managed:
                if proc.popen is None or proc.expected_down or proc.popen.poll() is None:
                    continue
                crash = {
                    "time": time.time(),
                    "name": proc.name,
                    "code": proc.popen.returncode,
                    "tail": proc.log_tail(),
                }
                self.crashes.append(crash)
                log(f"UNEXPECTED EXIT of {proc.name} (code {proc.popen.returncode}); restarting")
                self.start(proc)

    def reap_orphans(self) -> None:
        """Orphaned workers re-parented to us (subreaper) must be waited for, not left zombies."""
        me = os.getpid()
        for pid, info in process_table().items():
            if info.ppid == me and info.state == "Z" and pid not in self.popen_pids:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def cleanup(self) -> None:
        """Stop everything we started: wake frozen ones, SIGTERM, then SIGKILL what is left."""
        me = os.getpid()
        with self.lock:
            self.closed = True
            for proc in self.managed:
                proc.expected_down = True
        for pid in descendants(me, process_table()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        for group in (self.agents, [self.cp]):  # agents first: they tell the CP they drain
            for proc in group:
                proc.signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            for proc in group:
                if proc.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.popen.wait(max(0.1, deadline - time.monotonic()))
        for _ in range(5):
            left = descendants(me, process_table())
            if not left:
                break
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            for proc in self.managed:
                if proc.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.popen.wait(5)
            time.sleep(0.2)
            self.reap_orphans()


# --- load ---------------------------------------------------------------------------------


@dataclass
class Submission:
    sub_id: int
    kind: str
    job: str
    time: float
    body: dict[str, Any]
    outcome: str = "pending"  # acked | refused | unknown | rejected | skipped
    run_id: str | None = None
    detail: str = ""


class Load:
    """Submits runs at a steady rate; each submission's outcome is kept for the report."""

    def __init__(self, api: Api, rate: float, seed: int, marker: Path, stop_share: float) -> None:
        self.api = api
        self.rate = rate
        self.rng = random.Random(seed)
        self.marker = marker
        self.stop_share = stop_share
        self.submissions: list[Submission] = []
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="submit")
        self.in_flight = 0
        self.lock = threading.Lock()

    def _next(self) -> Submission:
        kinds = list(JOB_KINDS)
        kind = self.rng.choices(kinds, [JOB_KINDS[k][1] for k in kinds])[0]
        job = JOB_KINDS[kind][0]
        config: dict[str, Any] = {"marker": str(self.marker)}
        if kind == "chain":
            config["step_seconds"] = round(self.rng.uniform(0.0, 2.0), 2)
        elif kind == "chatty":
            config["lines"] = 1000
        elif kind == "sleep":
            config["seconds"] = round(self.rng.uniform(2.0, 5.0), 2)
        elif kind == "flaky":
            config["fail_until_retry"] = self.rng.choice([0, 0, 1, 2, 3])
        sub_id = len(self.submissions)
        tags = {"soak/kind": kind, "soak/sub": str(sub_id)}
        if self.rng.random() < self.stop_share:
            tags[STOP_TAG] = "stop"
        body = {"job": job, "location": "soak", "tags": tags, "config": config}
        return Submission(sub_id, kind, job, 0.0, body)

    def _submit(self, sub: Submission) -> None:
        try:
            status, body = self.api.call("POST", "/api/v1/runs", sub.body, timeout=15.0)
            if status == 201:
                sub.outcome, sub.run_id = "acked", body["run_id"]
            else:
                sub.outcome, sub.detail = "rejected", f"{status} {body!r}"[:200]
        except Unreachable as exc:
            sub.outcome = "refused" if exc.refused else "unknown"
            sub.detail = str(exc)[:200]
        finally:
            with self.lock:
                self.in_flight -= 1

    def run(self, until: float, stop: threading.Event) -> None:
        """Fixed inter-arrival times; a backlog over 1 s is dropped rather than bursted."""
        next_time = time.time()
        while not stop.is_set():
            now = time.time()
            if now >= until:
                break
            if next_time > now:
                stop.wait(min(next_time - now, until - now))
                continue
            next_time = max(next_time + 1.0 / self.rate, now - 1.0)
            sub = self._next()
            sub.time = now
            self.submissions.append(sub)
            with self.lock:
                if self.in_flight >= 32:
                    sub.outcome, sub.detail = "skipped", "32 submissions already in flight"
                    continue
                self.in_flight += 1
            self.pool.submit(self._submit, sub)
        self.pool.shutdown(wait=True)  # bounded: each call times out after 15 s


# --- faults -------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    target: str
    start: float
    params: dict[str, float] = field(default_factory=dict)
    measures: dict[str, float | None] = field(default_factory=dict)
    victims: list[tuple[str, int | None]] = field(default_factory=list)  # (run, lease)
    notes: list[str] = field(default_factory=list)
    end: float = 0.0


class Faults:
    """One fault at a time on a seeded schedule; each waits (bounded) for recovery."""

    def __init__(
        self, fleet: Fleet, seed: int, kinds: list[str], interval: tuple[float, float], t0: float
    ) -> None:
        self.fleet = fleet
        self.rng = random.Random(seed + 1)
        self.kinds = kinds
        self.interval = interval
        self.t0 = t0
        self.faults: list[Fault] = []
        self._cycle: list[str] = []

    def _kind(self) -> str:
        """Every kind once per cycle, in a seeded order, so a run sees all of them."""
        if not self._cycle:
            self._cycle = list(self.kinds)
            self.rng.shuffle(self._cycle)
        return self._cycle.pop()

    def run(self, until: float, stop: threading.Event) -> None:
        lo, hi = self.interval
        next_time = time.time() + self.rng.uniform(lo / 3, hi / 3)  # the first comes sooner
        while not stop.is_set():
            if next_time >= until:
                return
            if stop.wait(max(0.0, next_time - time.time())):
                return
            fault = self.inject(self._kind())
            self.faults.append(fault)
            next_time = time.time() + self.rng.uniform(lo, hi)

    def _victims(self, agent: Managed) -> list[tuple[str, int | None]]:
        try:
            return [(r["run_id"], r["lease"]) for r in self.fleet.api.active_runs(agent.name)]
        except (Unreachable, ApiError):
            return []

    def inject(self, kind: str) -> Fault:
        timeout = self.fleet.timeout
        agent = self.rng.choice(self.fleet.agents)
        fault = Fault(kind, agent.name, time.time())
        try:
            if kind == "cp_kill":
                fault.target = "control-plane"
                self._kill_and_restart(fault, self.fleet.cp, self.rng.uniform(0, 5))
            elif kind == "agent_kill":
                delay = self.rng.uniform(0, 2 * timeout)
                killed = self._kill_at_op_start(fault) if self.rng.random() < 0.5 else None
                agent = killed or agent
                fault.target = agent.name
                self._kill_and_restart(fault, agent, delay, already=killed is not None)
            elif kind == "worker_kill":
                self._kill_worker(fault)
            elif kind in ("agent_stop_short", "agent_stop_long"):
                fault.victims = self._victims(agent)
                seconds = (
                    self.rng.uniform(1.5, 0.6 * timeout)
                    if kind == "agent_stop_short"
                    else self.rng.uniform(timeout + 2, timeout + 6)
                )
                self._freeze(fault, agent, seconds)
            elif kind == "cp_stop_short":
                fault.target = "control-plane"
                self._freeze(fault, self.fleet.cp, self.rng.uniform(1.5, 0.6 * timeout))
        except Exception as exc:  # a harness problem: note it and go on with the soak
            fault.notes.append(f"harness error: {exc!r}")
            log(traceback.format_exc())
        fault.end = time.time()
        shown = " ".join(
            f"{k}={v:.2f}" if v is not None else f"{k}=NEVER"
            for k, v in {**fault.params, **fault.measures}.items()
        )
        log(
            f"+{fault.start - self.t0:.1f}s fault {kind} on {fault.target}: {shown} "
            f"{'; '.join(fault.notes)}"
        )
        return fault

    def _kill_and_restart(
        self, fault: Fault, proc: Managed, delay: float, already: bool = False
    ) -> None:
        """kill -9 (unless `already` killed at fault.start), wait `delay`, restart, measure."""
        fleet = self.fleet
        with fleet.lock:
            proc.expected_down = True
            if not already:
                fault.start = time.time()
            proc.kill9()
        if proc is not fleet.cp:  # what it was running, as the control plane still sees it
            fault.victims = self._victims(proc)
        time.sleep(delay)
        with fleet.lock:
            restarted = time.time()
            fleet.start(proc)
            proc.expected_down = False
        fault.params["down_s"] = restarted - fault.start
        names = [a.name for a in fleet.agents]
        if proc is fleet.cp:
            ready = wait_until(fleet.api.ready, RECOVERY_TIMEOUT, 0.05)
            fault.measures["readyz_after_restart_s"] = ready - restarted if ready else None
            back = fleet.agents_back(names, restarted, RECOVERY_TIMEOUT)
            fault.measures["agents_online_after_restart_s"] = back - restarted if back else None
        else:
            back = fleet.agents_back([proc.name], restarted, RECOVERY_TIMEOUT)
            fault.measures["online_after_restart_s"] = back - restarted if back else None

    def _kill_at_op_start(self, fault: Fault, timeout: float = 15.0) -> Managed | None:
        """SIGKILL the agent whose worker starts an op next, the moment its marker line appears.

        That lands between the worker's first records and the agent spooling them: the
        window in which a restarted agent can be offered the same launch (same lease) again.
        A helper process does the watching and the kill, so that the harness's other threads
        (the GIL) cannot delay it by milliseconds and miss the window.
        """
        fleet = self.fleet
        with fleet.lock:
            agents = {a.pid: a for a in fleet.agents if a.pid is not None}
            for agent in agents.values():
                agent.expected_down = True  # the helper may kill any of them
        code = (
            "import sys; from bench.soak import watch_and_kill;"
            " watch_and_kill(sys.argv[1], sys.argv[2], float(sys.argv[3]))"
        )
        marker = str(fleet.folder / "markers.log")
        pids = ",".join(map(str, agents))
        helper = subprocess.Popen(
            [sys.executable, "-c", code, marker, pids, str(timeout)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        fleet.popen_pids.add(helper.pid)
        try:
            out, _ = helper.communicate(timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            helper.kill()
            out, _ = helper.communicate()
        killed = None
        for line in out.splitlines():
            parts = line.split()
            if parts[:1] == ["killed"] and len(parts) == 8:
                killed = agents.get(int(parts[1]))
                fault.start = float(parts[2])
                run, lease, step, worker = parts[3][:8], parts[4], parts[5], parts[7]
                fault.notes.append(
                    f"killed as run {run} (lease {lease}) started op {step} in worker {worker}"
                )
        with fleet.lock:
            for agent in agents.values():
                agent.expected_down = agent is killed
        if killed is None:
            fault.notes.append(f"no op started within {timeout:g} s: killed at a random moment")
        return killed

    def _freeze(self, fault: Fault, proc: Managed, seconds: float) -> None:
        fault.params["stopped_s"] = seconds
        fault.start = time.time()
        if not proc.signal(signal.SIGSTOP):
            fault.notes.append("process not running: skipped")
            return
        try:
            time.sleep(seconds)
        finally:
            proc.signal(signal.SIGCONT)
        resumed = time.time()
        names = [a.name for a in self.fleet.agents] if proc is self.fleet.cp else [proc.name]
        if proc is self.fleet.cp:
            ready = wait_until(self.fleet.api.ready, RECOVERY_TIMEOUT, 0.05)
            fault.measures["readyz_after_cont_s"] = ready - resumed if ready else None
        back = self.fleet.agents_back(names, resumed, RECOVERY_TIMEOUT)
        fault.measures["heartbeat_after_cont_s"] = back - resumed if back else None

    def _kill_worker(self, fault: Fault) -> None:
        """A run worker is a session leader forked by the fork server (not the agent itself)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for agent in self.rng.sample(self.fleet.agents, len(self.fleet.agents)):
                pid = agent.pid
                if pid is None:
                    continue
                table = process_table()
                workers = {
                    p for p in descendants(pid, table) if table[p].sid == p and table[p].ppid != pid
                }
                try:
                    runs = [
                        r
                        for r in self.fleet.api.active_runs(agent.name)
                        if r["status"] == "STARTED"
                    ]
                except (Unreachable, ApiError):
                    continue
                self.rng.shuffle(runs)
                for run in runs:
                    try:
                        events = self.fleet.api.all_events(run["run_id"])
                    except (Unreachable, ApiError):
                        continue
                    starts = [e for e in events if e["type"] == "RUN_START"]
                    worker = starts[-1]["data"].get("pid") if starts else None
                    if worker in workers:
                        fault.target = agent.name
                        fault.start = time.time()
                        os.kill(worker, signal.SIGKILL)
                        fault.victims = [(run["run_id"], run["lease"])]
                        fault.notes.append(
                            f"killed pid {worker} of run {run['run_id'][:8]} ({run['job']}); "
                            f"{len(workers)} worker pid(s) under the agent in /proc"
                        )
                        return
            time.sleep(1.0)
        fault.notes.append("no running worker found within 30 s: skipped")


# --- sampling -----------------------------------------------------------------------------


@dataclass
class Sample:
    time: float
    process: str
    pid: int
    rss_kib: int
    fds: int


class Sampler:
    """RSS/fds of every fleet process and file sizes every `interval` s; also reaps orphans."""

    def __init__(self, fleet: Fleet, interval: float) -> None:
        self.fleet = fleet
        self.interval = interval
        self.samples: list[Sample] = []
        self.files: list[tuple[float, dict[str, int]]] = []
        self.errors: list[str] = []
        self.active = True  # cleared before the analysis, whose API reads would skew the RSS

    def sample(self) -> None:
        now = time.time()
        table = process_table()
        with self.fleet.lock:
            procs = [(m.name, m.pid) for m in self.fleet.managed]
        for name, pid in procs:
            if pid is None:
                continue
            self._one(now, name, pid)
            if name != "control-plane":
                for child in descendants(pid, table):
                    if table[child].ppid == pid and "agent.forkserver" in cmdline(child):
                        self._one(now, f"{name}/forkserver", child)
        db = self.fleet.db
        sizes = {"db": file_size(db), "wal": file_size(db.with_name(db.name + "-wal"))}
        for agent in self.fleet.agents:
            spool = self.fleet.spool(agent)
            sizes[f"spool {agent.name}"] = file_size(spool) + file_size(
                spool.with_name(spool.name + "-wal")
            )
        self.files.append((now, sizes))

    def _one(self, now: float, name: str, pid: int) -> None:
        rss, fds = rss_kib(pid), fd_count(pid)
        if rss is not None and fds is not None:
            self.samples.append(Sample(now, name, pid, rss, fds))

    def run(self, stop: threading.Event) -> None:
        next_sample = time.time()
        while not stop.wait(1.0):
            try:
                self.fleet.reap_orphans()
                self.fleet.check_exits()
                if self.active and time.time() >= next_sample:
                    self.sample()
                    next_sample += self.interval
            except Exception as exc:  # keep sampling; report what went wrong
                self.errors.append(repr(exc))


def retention_table(seconds: float) -> str:
    """`[retention]` keeping runs `seconds` after their end, their logs and outputs half
    as long, ticks as long as runs; nothing when 0."""
    if seconds <= 0:
        return ""
    days, half = seconds / 86400, seconds / 2 / 86400
    keys = ["success_days", "failure_days", "canceled_days", "ticks_success_days"]
    keys += ["ticks_skipped_days", "ticks_failure_days"]
    lines = [f"{key} = {days!r}" for key in keys]
    lines += [f"compute_logs_days = {half!r}", f"outputs_days = {half!r}"]
    return "[retention]\n" + "\n".join(lines) + "\n"


@dataclass
class Kept:
    """A run as the archive last saw it, with its events then."""

    run: dict[str, Any]
    events: list[dict[str, Any]]
    seen: float  # when it was last seen
    gone: float | None = None  # the first look that no longer found it


class Archive:
    """With retention on, the runs the control plane will purge: every `interval` s, each
    finished run and its events as they are then; and when a run is first found gone.
    The analysis reads a purged run from here, and checks that it was finished and past
    its retention when it went (`interval` is well below the retention, so every run is
    seen finished before it can go)."""

    def __init__(self, api: Api, interval: float) -> None:
        self.api = api
        self.interval = interval
        self.kept: dict[str, Kept] = {}
        self.looks = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()  # the harness's last look may meet the thread's

    def look(self) -> None:
        with self.lock:
            self._look()

    def _look(self) -> None:
        now = time.time()
        runs = {r["run_id"]: r for r in self.api.all_runs()}
        finished = [r for r in runs.values() if r["status"] in TERMINAL]
        with ThreadPoolExecutor(4) as pool:
            logs = list(pool.map(self.api.all_events, (r["run_id"] for r in finished)))
        for run, events in zip(finished, logs, strict=True):
            self.kept[run["run_id"]] = Kept(run, events, now)
        for run_id, kept in self.kept.items():
            if run_id not in runs and kept.gone is None:
                kept.gone = now
        self.looks += 1

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.look()
            except Exception as exc:  # the control plane may be down (a fault): next look
                self.errors.append(type(exc).__name__)


# --- analysis -----------------------------------------------------------------------------


@dataclass
class Attempt:
    lease: int
    agent_id: str
    start: float
    close_time: float | None = None
    close_type: str = ""  # the event that ended this lease
    close_kind: str = ""  # its failure_kind, if any

    @property
    def fenced(self) -> bool:
        """Closed by the control plane while the attempt itself may still have been running."""
        return self.close_type in ("RUN_STARTING", "RUN_WORKER_RESTARTED", "RUN_CANCELED") or (
            self.close_type == "RUN_FAILURE" and self.close_kind in FENCING_KINDS
        )


@dataclass
class Verdict:
    time: float
    run_id: str
    type: str
    kind: str
    lease: int | None
    agent_id: str


@dataclass
class RunFacts:
    run: dict[str, Any]
    events: list[dict[str, Any]]
    seq_problem: str = ""
    end_events: int = 0
    attempts: dict[int, Attempt] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    retry_events: list[dict[str, Any]] = field(default_factory=list)
    step_success: set[str] = field(default_factory=set)
    step_reused: set[str] = field(default_factory=set)


def analyze_run(run: dict[str, Any], events: list[dict[str, Any]]) -> RunFacts:
    """Seq contiguity, end events, and each lease's life (opened by RUN_STARTING, closed by
    the next RUN_STARTING, RUN_WORKER_RESTARTED or end event) from the run's event log."""
    facts = RunFacts(run, events)
    seqs = [e["seq"] for e in events]
    if seqs != list(range(1, len(seqs) + 1)):
        missing = sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))
        dups = sorted(s for s, n in Counter(seqs).items() if n > 1)
        facts.seq_problem = f"{len(seqs)} events; missing {missing[:10]}; repeated {dups[:10]}"
    current: Attempt | None = None
    for event in events:
        etype, data = event["type"], event.get("data") or {}
        when = _iso(event["time"]) or 0.0
        if etype == "RUN_STARTING" or etype == "RUN_WORKER_RESTARTED" or etype in END_EVENTS:
            if current is not None and current.close_time is None:
                current.close_time, current.close_type = when, etype
                current.close_kind = data.get("failure_kind", "") or ""
            if etype in END_EVENTS:
                facts.end_events += 1
            kind = data.get("failure_kind") or ""
            if etype == "RUN_WORKER_RESTARTED" or (etype == "RUN_FAILURE" and kind != "op_failure"):
                facts.verdicts.append(
                    Verdict(
                        when,
                        run["run_id"],
                        etype,
                        kind,
                        current.lease if current else None,
                        current.agent_id if current else "",
                    )
                )
            current = None
            if etype == "RUN_STARTING":
                current = Attempt(int(data["lease"]), str(data.get("agent_id", "")), when)
                facts.attempts[current.lease] = current
        elif etype == "RUN_RETRY":
            facts.retry_events.append(event)
        elif etype == "STEP_SUCCESS" and event.get("step"):
            facts.step_success.add(event["step"])
        elif etype == "STEP_REUSED" and event.get("step"):
            facts.step_reused.add(event["step"])
    return facts


@dataclass
class Marker:
    run_id: str
    lease: int
    step: str
    time: float
    pid: int


def read_markers(path: Path) -> tuple[list[Marker], int]:
    """Every op execution, and the number of malformed (torn) lines."""
    markers: list[Marker] = []
    bad = 0
    if not path.exists():
        return markers, bad
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        try:
            run_id, lease, step, when, pid = parts
            markers.append(Marker(run_id, int(lease), step, float(when), int(pid)))
        except ValueError:
            bad += 1
    return markers, bad


def slope_per_10min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope, in units per 10 minutes."""
    if len(points) < 3:
        return None
    mean_t = statistics.fmean(t for t, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    den = sum((t - mean_t) ** 2 for t, _ in points)
    if den == 0:
        return None
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / den * 600


@dataclass
class Check:
    name: str
    bad: int
    detail: list[str]


class Analysis:
    """The end-of-soak report, section by section, from the control plane's API, the marker
    file and the samples; the `checks` decide the exit status."""

    def __init__(
        self,
        args: argparse.Namespace,
        fleet: Fleet,
        load: Load,
        faults: Faults,
        sampler: Sampler,
        times: dict[str, float],
        archive: Archive | None = None,
    ) -> None:
        self.args, self.fleet, self.load, self.faults = args, fleet, load, faults
        self.sampler, self.times, self.t0 = sampler, times, times["start"]
        self.archive = archive
        self.lines: list[str] = []
        self.checks: list[Check] = []
        self.info: list[str] = []
        api = fleet.api
        self.runs = {r["run_id"]: r for r in api.all_runs()}
        with ThreadPoolExecutor(4) as pool:
            logs = list(pool.map(api.all_events, self.runs))
        # Runs that retention removed: as the archive last saw them.
        self.purged = {
            rid: kept
            for rid, kept in (archive.kept if archive else {}).items()
            if rid not in self.runs
        }
        for rid, kept in self.purged.items():
            self.runs[rid] = kept.run
            logs.append(kept.events)
        self.facts = {
            rid: analyze_run(run, events)
            for (rid, run), events in zip(self.runs.items(), logs, strict=True)
        }
        self.agent_names = {a["agent_id"]: name for name, a in api.agents().items()}
        self.markers, self.torn = read_markers(fleet.folder / "markers.log")

    def add(self, line: str = "") -> None:
        self.lines.append(line)

    def check(self, name: str, bad: list[str]) -> None:
        self.checks.append(Check(name, len(bad), bad[:10]))

    @property
    def failed(self) -> bool:
        return any(c.bad for c in self.checks)

    def rel(self, t: float) -> str:
        return f"+{t - self.t0:.1f}s"

    def stop_tagged(self, run_id: str) -> bool:
        return self.runs[run_id]["tags"].get(STOP_TAG) == "stop"

    def report(self) -> str:
        for section in (
            self.header,
            self.submissions,
            self.chains,
            self.executions,
            self.event_logs,
            self.memory,
            self.retention,
            self.fault_log,
            self.processes,
            self.summary,
        ):
            section()
        return "\n".join(self.lines)

    def header(self) -> None:
        args, times = self.args, self.times
        self.add(
            f"soak: {(times['load_end'] - self.t0) / 60:.1f} min of load at {args.rate:g} runs/s,"
            f" {args.agents} agents x {args.slots} slots, seed {args.seed}, heartbeat timeout"
            f" {args.timeout:g} s, {len(self.faults.faults)} faults, fault-free for the last"
            f" {args.quiet:.0f} s"
        )
        drained = times["drained"] - times["load_end"]
        self.add(
            f"drained {drained:.1f} s after the load ended"
            + ("" if times["drain_ok"] else " (NOT drained: the bounded wait ran out)")
        )
        self.add(f"folder: {self.fleet.folder}")

    def submissions(self) -> None:
        subs = self.load.submissions
        outcomes = Counter(s.outcome for s in subs)
        self.add()
        self.add("== submissions")
        kinds = ("acked", "refused", "unknown", "rejected", "skipped")
        self.add("  " + ", ".join(f"{k} {outcomes.get(k, 0)}" for k in kinds))
        self.add("  (refused: connection refused, nothing created; unknown: sent, no answer)")
        for detail, n in Counter(s.detail[:80] for s in subs if s.outcome == "rejected").items():
            self.add(f"  rejected x{n}: {detail}")
        # An unknown submission may have been created before its answer was lost.
        unknown = [s for s in subs if s.outcome == "unknown"]
        created = []
        for sub in unknown:
            found = self.fleet.api.all_runs(f"&tag=soak/sub:{sub.sub_id}")
            created += [r["run_id"] for r in found if not r["parent_run_id"]]
        if unknown:
            still_open = [r for r in created if self.runs[r]["status"] not in TERMINAL]
            self.add(
                f"  unknown submissions created anyway: {len(created)} of {len(unknown)} (not"
                f" acked, so not counted below); of these not terminal: {still_open or 0}"
            )

    def chains(self) -> None:
        """Acked runs: terminal or LOST, and how their retry chains ended."""
        runs, facts = self.runs, self.facts
        children: dict[str, list[str]] = defaultdict(list)
        for r in runs.values():
            if r["parent_run_id"]:
                children[r["parent_run_id"]].append(r["run_id"])
        lost: list[str] = []
        retry_lost: list[str] = []
        dup_retries: list[str] = []
        missing_retry: list[str] = []
        impossible: list[str] = []
        own: dict[str, Counter[str]] = defaultdict(Counter)
        ends: dict[str, Counter[str]] = defaultdict(Counter)
        mismatch: Counter[str] = Counter()
        terminal = succeeded = succeeded_retried = 0
        acked = [s for s in self.load.submissions if s.outcome == "acked"]
        for sub in acked:
            assert sub.run_id is not None
            run = runs.get(sub.run_id)
            where = f"{sub.run_id} ({sub.kind}, acked {self.rel(sub.time)})"
            if run is None:
                lost.append(f"{where}: unknown to the control plane")
                continue
            own[sub.kind][run["status"]] += 1
            if run["status"] not in TERMINAL:
                lost.append(f"{where}: {run['status']}")
                continue
            terminal += 1
            chain = [run]
            for _ in range(MAX_RETRIES + 5):  # bounded even if the chain were longer
                kids = children.get(chain[-1]["run_id"], [])
                if len(kids) > 1:
                    dup_retries.append(f"{chain[-1]['run_id']}: retried by {kids}")
                if not kids:
                    break
                chain.append(runs[kids[0]])
            last = chain[-1]
            retry_lost += [
                f"{m['run_id']} (retry of {sub.run_id}): {m['status']}"
                for m in chain[1:]
                if m["status"] not in TERMINAL
            ]
            ends[sub.kind][last["status"]] += 1
            if last["status"] == "SUCCESS":
                succeeded += 1
                succeeded_retried += len(chain) > 1
            if last["status"] == "FAILURE":
                number = int(last["tags"].get("fleetrun/retry_number", "0"))
                decisions = facts[last["run_id"]].retry_events
                promised = [(e.get("data") or {}).get("retry_run_id") for e in decisions]
                retry_lost += [f"{p} (promised by {last['run_id']})" for p in promised if p]
                if number < MAX_RETRIES and not decisions:
                    missing_retry.append(f"{last['run_id']} ({last['failure_kind']}, #{number})")
            if sub.kind == "flaky":
                until = int(sub.body["config"]["fail_until_retry"])
                planned = "SUCCESS" if until <= MAX_RETRIES else "FAILURE"
                if last["status"] != planned:
                    mismatch[f"planned {planned}, ended {last['status']}"] += 1
                    if planned == "FAILURE":
                        impossible.append(f"{sub.run_id}: fail_until_retry={until}, ended SUCCESS")
        retries = sum(1 for r in runs.values() if r["parent_run_id"])
        self.add()
        self.add("== runs")
        self.add(
            f"  acked {len(acked)}; reached a terminal status {terminal}; LOST {len(lost)} (goal 0)"
        )
        self.add(
            f"  runs in the control plane {len(runs)} (of which retries {retries}); acked runs"
            f" whose retry chain ended in SUCCESS {succeeded} ({succeeded_retried} after a retry)"
        )
        self.add(f"  {'kind':<8}{'acked':>6}  final status: of the acked run | of its retry chain")
        for kind in JOB_KINDS:
            a, b = own.get(kind, Counter()), ends.get(kind, Counter())
            first = " ".join(f"{s}={n}" for s, n in sorted(a.items())) or "-"
            second = " ".join(f"{s}={n}" for s, n in sorted(b.items())) or "-"
            self.add(f"  {kind:<8}{sum(a.values()):>6}  {first} | {second}")
        kinds = Counter(r["failure_kind"] for r in runs.values() if r["status"] == "FAILURE")
        shown = ", ".join(f"{k}={n}" for k, n in kinds.most_common()) or "none"
        self.add(f"  FAILURE runs by failure_kind (retries included): {shown}")
        if mismatch:
            shown = ", ".join(f"{k}: {n}" for k, n in mismatch.items())
            self.add(f"  flaky chains not ending as planned (faults use retries up too): {shown}")
        resumed = sum(1 for f in facts.values() if len(f.attempts) > 1)
        self.add(f"  runs with more than one lease (relaunched or resumed): {resumed}")
        self.check("acked runs never terminal (LOST)", lost)
        self.check("retries missing or never terminal", retry_lost)
        self.check("failures retried more than once", dup_retries)
        self.check("failures without a retry decision", missing_retry)
        self.check("chains that succeeded though planned to fail", impossible)

    def executions(self) -> None:
        """What the marker file says about executions per run, lease and step."""
        markers, facts = self.markers, self.facts
        per_attempt: dict[tuple[str, int, str], list[Marker]] = defaultdict(list)
        for m in markers:
            per_attempt[(m.run_id, m.lease, m.step)].append(m)
        duplicates = [
            f"run {r} lease {lease} step {s}: {len(ms)} executions, by pids"
            f" {[m.pid for m in ms]}, {max(m.time for m in ms) - min(m.time for m in ms):.3f} s"
            f" apart; run ended {self.runs[r]['status'] if r in self.runs else '?'}"
            for (r, lease, s), ms in per_attempt.items()
            if len(ms) > 1
        ]
        first_of_lease: dict[tuple[str, int], float] = {}
        for m in markers:
            key = (m.run_id, m.lease)
            first_of_lease[key] = min(first_of_lease.get(key, m.time), m.time)
        unknown_lease: list[str] = []
        own_end: list[str] = []
        late: list[float] = []
        late_attempts: set[tuple[str, int]] = set()
        overlaps: Counter[str] = Counter()
        for m in markers:
            run_facts = facts.get(m.run_id)
            attempt = run_facts.attempts.get(m.lease) if run_facts else None
            if run_facts is None or attempt is None:
                unknown_lease.append(f"run {m.run_id} lease {m.lease} step {m.step}")
                continue
            if attempt.close_time is not None and m.time > attempt.close_time:
                lag = m.time - attempt.close_time
                if attempt.fenced:
                    late.append(lag)
                    late_attempts.add((m.run_id, m.lease))
                else:
                    own_end.append(
                        f"run {m.run_id} lease {m.lease} step {m.step} started {lag:.3f} s"
                        f" after {attempt.close_type} {attempt.close_kind}"
                    )
            newer = [
                first_of_lease[(m.run_id, lease)]
                for lease in run_facts.attempts
                if lease > m.lease and (m.run_id, lease) in first_of_lease
            ]
            if newer and m.time > min(newer):
                overlaps["on_lost_contact=stop" if self.stop_tagged(m.run_id) else "default"] += 1
        per_step = Counter((m.run_id, m.step) for m in markers)
        fenced = sum(1 for f in facts.values() for a in f.attempts.values() if a.fenced)
        self.add()
        self.add("== executions (from the marker file: one line per op execution)")
        self.add(
            f"  op executions {len(markers)} (torn lines {self.torn}); steps executed more than"
            f" once in a run, across its leases: {sum(1 for n in per_step.values() if n > 1)}"
        )
        self.add(f"  duplicate executions of one step under one lease: {len(duplicates)} (goal 0)")
        self.add(f"  executions under a lease the control plane never issued: {len(unknown_lease)}")
        self.add(
            f"  fenced attempts (lease ended by the control plane: relaunch, resume, agent"
            f" lost/restarted, timeout): {fenced}; {len(late_attempts)} of them started"
            f" {len(late)} op execution(s) after the fence"
            + (f" (up to {max(late):.2f} s after)" if late else "")
        )
        self.add("    (its worker stops itself at its lease deadline, before the fence; only a run")
        self.add("    tagged on_lost_contact=continue runs on until its agent hears of the fence)")
        self.add(
            f"  op executions of a lease after a newer lease of the same run had started (two"
            f" attempts at once): {dict(overlaps) or 0}"
        )
        self.add(
            f"  op executions after their own attempt's end event (success, op failure, worker"
            f" crash): {len(own_end)} (goal 0)"
        )
        executed = {(m.run_id, m.step) for m in markers}
        phantom = [
            f"{rid} {step}"
            for rid, f in facts.items()
            if self.runs[rid]["status"] == "SUCCESS"
            for step in f.step_success
            if (rid, step) not in executed
        ]
        self.add(f"  STEP_SUCCESS events with no execution of that step in the run: {len(phantom)}")
        self.check("duplicate executions of one step under one lease", duplicates)
        self.check("op executions after their attempt's own end", own_end)
        self.check("executions under unknown leases", unknown_lease)
        self.check("STEP_SUCCESS without an execution", phantom)

    def event_logs(self) -> None:
        facts = self.facts
        gaps = [f"{rid}: {f.seq_problem}" for rid, f in facts.items() if f.seq_problem]
        multi_end = [
            f"{rid}: {f.end_events} end events" for rid, f in facts.items() if f.end_events > 1
        ]
        self.add()
        self.add("== event logs (GET /api/v1/runs/{id}/events of every run)")
        self.add(
            f"  runs {len(facts)}, events {sum(len(f.events) for f in facts.values())}; seq 1..N"
            f" contiguous in {len(facts) - len(gaps)}, gap or repeat in {len(gaps)} (goal 0)"
        )
        self.add(
            f"  runs with more than one RUN_SUCCESS/RUN_FAILURE/RUN_CANCELED: {len(multi_end)}"
        )
        incomplete = [
            f"{rid} ({self.runs[rid]['job']}): {sorted(missing)}"
            for rid, f in facts.items()
            if self.runs[rid]["status"] == "SUCCESS"
            and (missing := set(JOB_STEPS[self.runs[rid]["job"]]) - f.step_success - f.step_reused)
        ]
        self.add(
            f"  SUCCESS runs with a step that neither succeeded nor was reused: {len(incomplete)}"
        )
        self.check("event seq gaps or repeats", gaps)
        self.check("runs with several end events", multi_end)
        self.check("SUCCESS runs missing a step", incomplete)

    def memory(self) -> None:
        """RSS per process lifetime (a restart starts a new one), fds and file sizes."""
        args, sampler = self.args, self.sampler
        self.add()
        self.add(
            f"== memory: RSS in MiB per process lifetime; slope (MiB per 10 min) after the first"
            f" {args.warmup:.0f} s of each lifetime"
        )
        self.add(
            f"  {'process':<20}{'pid':>8}{'from':>9}{'to':>9}{'n':>5}{'first':>8}{'median':>8}"
            f"{'last':>8}{'slope':>8}  fds first/max/last"
        )
        series: dict[tuple[str, int], list[Sample]] = defaultdict(list)
        for s in sampler.samples:
            series[(s.process, s.pid)].append(s)
        growing = []
        for (name, pid), points in sorted(series.items(), key=lambda kv: (kv[0][0], kv[1][0].time)):
            rss = [p.rss_kib / 1024 for p in points]
            born = points[0].time
            settled = [(p.time, p.rss_kib / 1024) for p in points if p.time - born >= args.warmup]
            slope = slope_per_10min(settled)
            span = settled[-1][0] - settled[0][0] if settled else 0.0
            fds = [p.fds for p in points]
            shown = f"{slope:+.2f}" if slope is not None else "n/a"
            self.add(
                f"  {name:<20}{pid:>8}{self.rel(born):>9}{self.rel(points[-1].time):>9}"
                f"{len(points):>5}{rss[0]:>8.1f}{statistics.median(rss):>8.1f}{rss[-1]:>8.1f}"
                f"{shown:>8}  {fds[0]}/{max(fds)}/{fds[-1]}"
            )
            if slope is not None and span >= 300 and slope > args.rss_slope_warn:
                growing.append(
                    f"{name} pid {pid}: {slope:+.2f} MiB/10 min over {span / 60:.0f} min"
                )
        limit = args.rss_slope_warn
        if growing:
            self.add(f"  GROWING (over {limit:g} MiB/10 min for >= 5 min): {'; '.join(growing)}")
            self.info.append(f"RSS growing in {len(growing)} lifetime(s)")
        else:
            self.add(
                f"  flat: no lifetime with >= 5 min past warm-up grew over {limit:g} MiB/10 min"
            )
        if sampler.files:
            for key in sampler.files[-1][1]:
                values = [sizes.get(key, 0) / 2**20 for _, sizes in sampler.files]
                self.add(
                    f"  {key + ' size':<20} max {max(values):.1f} MiB, last {values[-1]:.1f} MiB"
                )
        if sampler.errors:
            self.add(f"  sampler errors: {Counter(sampler.errors).most_common(3)}")

    def retention(self) -> None:
        """With retention on: what it removed, that it removed only finished runs past
        their limit, and the database's size over the soak (flat once runs age out)."""
        if self.archive is None:
            return
        limit = self.args.retention_seconds
        never_finished = [
            f"{rid}: last seen {kept.run['status']}"
            for rid, kept in self.purged.items()
            if kept.run["status"] not in TERMINAL
        ]
        lived = {
            rid: kept.gone - end
            for rid, kept in self.purged.items()
            if kept.gone is not None and (end := _iso(kept.run["end_time"])) is not None
        }
        early = [
            f"{rid}: gone {age:.1f} s after its end" for rid, age in lived.items() if age < limit
        ]
        self.add()
        self.add(
            f"== retention (runs kept {limit:g} s after their end, logs and outputs"
            f" {limit / 2:g} s; the archive looked {self.archive.looks} times,"
            f" every {self.archive.interval:g} s)"
        )
        self.add(
            f"  runs removed by retention {len(self.purged)} (each seen finished first, with its"
            f" events); still in the database {len(self.runs) - len(self.purged)}"
        )
        if lived:
            ages = sorted(lived.values())
            self.add(
                f"  removed {ages[0]:.0f} to {ages[-1]:.0f} s after their end (median"
                f" {statistics.median(ages):.0f} s; the loop looks every 30 s when idle)"
            )
        if self.archive.errors:
            self.add(f"  looks that failed (faults): {dict(Counter(self.archive.errors))}")
        self.add("  database + WAL size, MiB, by share of the soak (goal: flat after the first")
        self.add(f"  {limit:g} s, when runs start to age out):")
        self.add("    " + "  ".join(f"{share}: {size:.1f}" for share, size in self.size_curve()))
        settled = [
            (t, (sizes["db"] + sizes["wal"]) / 2**20)
            for t, sizes in self.sampler.files
            if t - self.t0 >= 2 * limit
        ]
        slope = slope_per_10min(settled)
        if slope is not None:
            self.add(f"    slope from {2 * limit:g} s on: {slope:+.2f} MiB per 10 min")
        self.check("runs removed before they finished", never_finished)
        self.check("runs removed before their retention", early)

    def size_curve(self) -> list[tuple[str, float]]:
        """Database + WAL size at 0, 25, ..., 100 % of the soak's samples."""
        files = self.sampler.files
        if not files:
            return []
        curve = []
        for share in (0, 25, 50, 75, 100):
            _, sizes = files[min(len(files) - 1, len(files) * share // 100)]
            curve.append((f"{share}%", (sizes["db"] + sizes["wal"]) / 2**20))
        return curve

    def fault_log(self) -> None:
        """Each fault, its recovery, and the verdicts it caused (or should not have caused)."""
        faults = self.faults.faults
        verdicts = sorted(
            (v for f in self.facts.values() for v in f.verdicts), key=lambda v: v.time
        )
        windows = []
        for i, fault in enumerate(faults):
            nxt = faults[i + 1].start if i + 1 < len(faults) else float("inf")
            windows.append((fault.start, min(nxt, fault.end + self.args.timeout + 15)))
        self.add()
        self.add(
            "== faults (verdict = RUN_FAILURE other than op_failure, or RUN_WORKER_RESTARTED;"
            " window = until the next fault, at most timeout + 15 s after recovery)"
        )
        unexpected = 0
        for fault, (w_start, w_end) in zip(faults, windows, strict=True):
            params = " ".join(f"{k}={v:.1f}" for k, v in fault.params.items())
            self.add(f"  {self.rel(fault.start):>9} {fault.kind:<17} {fault.target:<14} {params}")
            for note in fault.notes:
                self.add(f"      {note}")
            if fault.measures:
                shown = ", ".join(
                    f"{k} {v:.2f}" if v is not None else f"{k} NEVER (> {RECOVERY_TIMEOUT:g} s)"
                    for k, v in fault.measures.items()
                )
                self.add(f"      recovery: {shown}")
            if fault.victims:
                ended: Counter[str] = Counter()
                for run_id, lease in fault.victims:
                    facts = self.facts.get(run_id)
                    attempt = facts.attempts.get(lease or -1) if facts else None
                    if attempt is not None and attempt.close_time is not None:
                        suffix = f"/{attempt.close_kind}" if attempt.close_kind else ""
                        ended[f"{attempt.close_type}{suffix}"] += 1
                self.add(f"      its {len(fault.victims)} active run(s) ended: {dict(ended)}")
            in_window = [v for v in verdicts if w_start <= v.time < w_end]
            targets = {aid for aid, name in self.agent_names.items() if name == fault.target}
            victims = {r for r, _ in fault.victims}
            surprising = []
            for v in in_window:
                if fault.kind in HARMLESS_FAULTS:
                    bad = not self.stop_tagged(v.run_id)
                elif fault.kind == "worker_kill":
                    bad = v.run_id not in victims and not self.stop_tagged(v.run_id)
                else:
                    bad = v.agent_id not in targets
                if bad:
                    surprising.append(v)
            counts = dict(Counter(f"{v.type}/{v.kind}" for v in in_window)) or "none"
            self.add(f"      verdicts: {counts}")
            hit = [v.time - fault.start for v in in_window if v not in surprising]
            if hit and fault.kind not in HARMLESS_FAULTS:
                self.add(
                    f"      detection (fault -> verdict on the target's runs): first"
                    f" {min(hit):.2f} s, last {max(hit):.2f} s"
                )
            for v in surprising[:5]:
                self.add(
                    f"      UNEXPECTED {self.rel(v.time)} run {v.run_id} on"
                    f" {self.agent_names.get(v.agent_id, v.agent_id)}: {v.type}/{v.kind}"
                )
            unexpected += len(surprising)
        outside = [
            v
            for v in verdicts
            if not any(a <= v.time < b for a, b in windows) and not self.stop_tagged(v.run_id)
        ]
        self.add(f"  verdicts outside every fault window: {len(outside)}")
        for v in outside[:5]:
            self.add(f"      {self.rel(v.time)} run {v.run_id} {v.type}/{v.kind}")
        if unexpected or outside:
            self.info.append(f"{unexpected + len(outside)} unexpected verdict(s)")

    def processes(self) -> None:
        """Exits the harness did not cause are crashes; log warnings are worth a look."""
        fleet = self.fleet
        self.add()
        self.add("== processes")
        for crash in fleet.crashes:
            self.add(
                f"  UNEXPECTED EXIT {self.rel(crash['time'])} {crash['name']} code {crash['code']}"
            )
            for line in crash["tail"].splitlines()[-8:]:
                self.add(f"      {line}")
        for proc in fleet.managed:
            text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
            levels = Counter(
                level
                for line in text.splitlines()
                for level in ("CRITICAL", "ERROR", "WARNING")
                if f" {level} " in line
            )
            self.add(
                f"  {proc.name}: {proc.generation} start(s); log lines {dict(levels) or 'clean'},"
                f" tracebacks {text.count('Traceback (most recent call last)')}"
            )
        crashes = [f"{c['name']} code {c['code']} at {self.rel(c['time'])}" for c in fleet.crashes]
        self.check("unexpected process exits", crashes)

    def summary(self) -> None:
        self.add()
        self.add("== checks (any FAIL makes the exit status 1)")
        for c in self.checks:
            self.add(f"  {'FAIL' if c.bad else 'ok  '} {c.name}: {c.bad}")
            for line in c.detail[:5]:
                self.add(f"         {line}")
        self.add(
            f"  not failing the soak: {'; '.join(self.info) or 'no unexpected verdicts, RSS flat'}"
        )


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="load duration (30)")
    parser.add_argument("--agents", type=int, default=2, help="agents (2)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random)")
    parser.add_argument("--rate", type=float, default=3.0, help="submissions per second (3)")
    parser.add_argument("--slots", type=int, default=4, help="max_concurrent_runs per agent (4)")
    parser.add_argument("--timeout", type=float, default=6.0, help="heartbeat timeout, s (6)")
    parser.add_argument(
        "--resume",
        type=int,
        default=1,
        help="max_resume_run_attempts (1): a lost worker first resumes within its run (new"
        " lease), a second loss fails the run and the retry policy (max_retries 2) takes over",
    )
    parser.add_argument(
        "--fault-interval",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="seconds between faults (60 120; scaled by minutes/10 when shorter than 10 minutes)",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=None,
        help="fault-free seconds at the end (120; scaled like the interval)",
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help="comma-separated fault kinds to inject (all)",
    )
    parser.add_argument(
        "--stop-share",
        type=float,
        default=0.1,
        help="share of runs tagged fleetrun/on_lost_contact=stop (0.1)",
    )
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds (10)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of a process's life left out of its RSS slope "
        "(120, or a quarter of the run if shorter)",
    )
    parser.add_argument(
        "--rss-slope-warn",
        type=float,
        default=4.0,
        help="MiB per 10 min over which a lifetime is flagged as growing (4)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="bound on the wait for active runs to end (300)",
    )
    parser.add_argument(
        "--retention-seconds",
        type=float,
        default=0.0,
        help="[retention]: runs kept this long after their end, logs and outputs half as"
        " long; the report shows the database size over time (0: off)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the folder even when all passes")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 1_000_000)
    kinds = [k for k in args.faults.split(",") if k]
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or args.agents < 1 or args.minutes <= 0 or args.rate <= 0:
        parser.error(f"bad arguments (fault kinds are {', '.join(FAULT_KINDS)})")
    args.fault_kinds = kinds
    scale = min(1.0, args.minutes / 10)
    if args.fault_interval is None:
        args.fault_interval = (60 * scale, 120 * scale)
    if args.quiet is None:
        args.quiet = 120 * scale
    if args.warmup is None:
        args.warmup = min(120.0, args.minutes * 60 / 4)
    return args


def wait_drained(api: Api, timeout: float) -> bool:
    """No active run in three checks 2 s apart (a FAILURE's retry is queued in between)."""
    deadline = time.monotonic() + timeout
    calm = 0
    while time.monotonic() < deadline:
        try:
            active = api.get(f"/api/v1/runs?status={ACTIVE}&limit=1")["runs"]
            calm = 0 if active else calm + 1
        except (Unreachable, ApiError):
            calm = 0
        if calm >= 3:
            return True
        time.sleep(2.0)
    return False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (e.g. from make or CI) cleans up like Ctrl-C does."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def soak(args: argparse.Namespace) -> int:
    subreaper = become_subreaper()
    folder = Path(tempfile.mkdtemp(prefix="fleetrun-soak-"))
    fleet = Fleet(
        folder, args.agents, args.timeout, args.slots, args.resume, args.retention_seconds
    )
    stop = threading.Event()
    threads: list[threading.Thread] = []
    log(
        f"folder {folder}; seed {args.seed}; control plane {fleet.url}"
        + ("" if subreaper else "; WARNING: not a subreaper, orphans may escape cleanup")
    )
    passed = False
    try:
        fleet.start(fleet.cp)
        if wait_until(fleet.api.ready, 60) is None:
            raise RuntimeError(f"control plane not ready:\n{fleet.cp.log_tail()}")
        for agent in fleet.agents:
            fleet.start(agent)
        if fleet.agents_back([a.name for a in fleet.agents], 0, 60) is None:
            raise RuntimeError("agents did not come online")
        sampler = Sampler(fleet, args.sample_every)
        threads.append(threading.Thread(target=sampler.run, args=(stop,), daemon=True))
        threads[-1].start()
        archive = None
        if args.retention_seconds > 0:
            archive = Archive(fleet.api, min(10.0, args.retention_seconds / 6))
            threads.append(threading.Thread(target=archive.run, args=(stop,), daemon=True))
            threads[-1].start()

        start = time.time()
        load_end = start + args.minutes * 60
        times = {"start": start, "load_end": load_end, "quiet": args.quiet, "warmup": args.warmup}
        load = Load(fleet.api, args.rate, args.seed, folder / "markers.log", args.stop_share)
        faults = Faults(fleet, args.seed, args.fault_kinds, tuple(args.fault_interval), start)
        load_thread = threading.Thread(target=load.run, args=(load_end, stop), daemon=True)
        fault_thread = threading.Thread(
            target=faults.run, args=(load_end - args.quiet, stop), daemon=True
        )
        load_thread.start()
        fault_thread.start()
        log(
            f"load {args.rate:g} runs/s for {args.minutes:g} min; faults every "
            f"{args.fault_interval[0]:.0f}-{args.fault_interval[1]:.0f} s until "
            f"{args.quiet:.0f} s before the end"
        )
        while load_thread.is_alive():
            load_thread.join(60)
            outcomes = Counter(s.outcome for s in load.submissions)
            rss = {s.process: s.rss_kib // 1024 for s in sampler.samples[-10:]}
            log(f"+{time.time() - start:.0f}s submissions {dict(outcomes)}; RSS MiB {rss}")
        fault_thread.join(300)  # a fault in progress takes at most ~2 x RECOVERY_TIMEOUT
        log("load over; waiting for active runs to end")
        times["drain_ok"] = float(wait_drained(fleet.api, args.drain_timeout))
        times["drained"] = time.time()
        sampler.sample()
        sampler.active = False
        log("analysing")
        if archive is not None:
            archive.look()  # the last word on which runs are gone
        analysis = Analysis(args, fleet, load, faults, sampler, times, archive)
        print(analysis.report(), flush=True)
        raw = {
            "faults": [vars(f) for f in faults.faults],
            "crashes": fleet.crashes,
            "samples": [vars(s) for s in sampler.samples],
            "files": sampler.files,
            "submissions": [vars(s) for s in load.submissions],
        }
        (folder / "soak.json").write_text(json.dumps(raw, default=str))
        passed = not analysis.failed
        return 0 if passed else 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut cleanup short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()
        for thread in threads:
            thread.join(5)
        fleet.cleanup()
        if passed and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            log(f"kept {folder} (logs, database, markers.log, soak.json)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with sigterm_as_interrupt():
        try:
            return soak(args)
        except KeyboardInterrupt:
            log("interrupted: everything started was stopped")
            return 130
        except Exception:
            log(f"harness error:\n{traceback.format_exc()}")
            return 2


if __name__ == "__main__":
    sys.exit(main())
