"""Dagster OSS on fleetrun's two bench workloads, on this machine in the same run.

Why: the fleetrun/Dagster ratio is only meaningful if both are measured on the same machine at
the same time, so this module installs Dagster itself (PyPI, into its own venv under `.bench/`,
never into the project's venv) and measures it the way `bench/latency.py` measures fleetrun.

Deployment (Dagster's defaults for a local OSS deployment, as `dagster dev` lays it out):
- a temporary DAGSTER_HOME with SQLite storage (the default), telemetry off, and a dagster.yaml
  naming `QueuedRunCoordinator` (default dequeue interval, `max_concurrent_runs` = the
  concurrency asked for, 32 = fleetrun's 4 agents x 8 slots) and `DefaultRunLauncher`;
- one `dagster code-server start` serving `dagster_side/jobs.py` (job `hello`: one op that does
  nothing, Dagster's default multiprocess executor) and a workspace.yaml pointing at it, loaded
  by both `dagster-webserver` and `dagster-daemon run`. The launcher asks the code server over
  gRPC to start the run; the code server spawns a new run-worker process per run.
Submission goes through the webserver's GraphQL `launchRun` mutation (what the UI and
`DagsterGraphQLClient` use), so the run is created and handed to the QueuedRunCoordinator.

Timings are read afterwards from Dagster's own instance (run records and event log) by
`dagster_side/records.py`, run by the Dagster venv's python; `t0` is the wall time just before
the POST, as in latency.py:
- submit -> launch received: the ENGINE_EVENT "Started process for run (pid: N)." which is the
  first event the run worker writes itself (after it has started and loaded the run). Dagster
  has no event for the code server receiving the launch; RUN_STARTING is earlier but is written
  by the daemon when it dequeues the run, before it even calls the launcher.
- submit -> STARTED: the run record's `start_time` (RUN_START, written by the run worker).
- submit -> SUCCESS: the run record's `end_time`.
- burst: runs/s = M / (last `end_time` - `t0` of the first submit); time in queue = RUN_STARTING
  event time - the run record's `create_timestamp`.

Cost: with Dagster's defaults the daemon launches queued runs one at a time (no
`dequeue_use_threads`) and each launch blocks until the new run worker has imported Dagster
and loaded the run (seconds on 2 cores), so the burst runs at well under 1 run/s and few runs
are ever in flight: a 1000-run burst takes the better part of an hour here.

Usage: `python -m bench.dagster [--runs N] [--burst M] [--concurrency C]`, from the repo root.
Only the standard library is imported here: the main venv has no dagster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.harness import descendants, process_table

REPO = Path(__file__).resolve().parent.parent
SIDE = Path(__file__).resolve().parent / "dagster_side"
VERSION = "1.13.28"
PACKAGES = [f"dagster=={VERSION}", f"dagster-webserver=={VERSION}", f"dagster-graphql=={VERSION}"]
VENV = REPO / ".bench" / "dagster-venv"
STAMP = VENV / "fleetrun-bench-installed.txt"
LOCATION = "bench"
JOB = "hello"
TAG = "fleetrun-bench"

INSTALL_TIMEOUT = 1200.0  # pip install of dagster + webserver + graphql (about 1 min here)
STARTUP_TIMEOUT = 180.0  # each of code server, webserver, daemon to be up (Dagster's own: 180 s)
RUN_TIMEOUT = 180.0  # one idle run, submit to finished
BURST_STALL_TIMEOUT = 300.0  # the burst fails if no run finishes for this long
BURST_TIMEOUT_PER_RUN = 10.0  # ... or if the whole burst takes longer than this per run
RECORDS_TIMEOUT = 600.0  # reading the timings back from the instance
HTTP_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0  # SIGTERM grace before SIGKILL
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _base_python() -> str:
    """python3.11 from PATH, else this interpreter if it is a 3.11 (venv creates from its base)."""
    found = shutil.which("python3.11")
    if found:
        return found
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    raise RuntimeError("python3.11 not found on PATH: needed to create the Dagster venv")


def ensure_venv() -> Path:
    """Install Dagster into its own venv once; the stamp file records what was installed."""
    wanted = f"python {sys.version_info[0]}.{sys.version_info[1]}\n" + "\n".join(PACKAGES) + "\n"
    python = VENV / "bin" / "python"
    if python.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return python
    VENV.parent.mkdir(parents=True, exist_ok=True)
    log = VENV.parent / "dagster-venv-install.log"
    print(f"installing {' '.join(PACKAGES)} into {VENV} (log: {log})", file=sys.stderr)
    with open(log, "wb") as out:
        steps = [[_base_python(), "-m", "venv", str(VENV)]] if not python.exists() else []
        steps.append(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", *PACKAGES]
        )
        for cmd in steps:
            try:
                subprocess.run(
                    cmd, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT, check=True
                )
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"timed out after {INSTALL_TIMEOUT:g} s: {cmd}") from exc
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(f"{cmd} failed ({exc.returncode}):\n{_tail(log)}") from exc
    STAMP.write_text(wanted)
    return python


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: all are held open until all are picked."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _proc_start(pid: int) -> str | None:
    """The process's start time from /proc (to tell it from a later process with its pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class _Process:
    """A Dagster service started in its own session, with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                cmd,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(
                f"{self.name} exited with code {code}; log {self.log}:\n{_tail(self.log)}"
            )


def _stop(procs: list[_Process]) -> None:
    """SIGTERM each service's session and its descendants, SIGKILL whatever outlives the grace."""
    victims: dict[int, str | None] = {}
    for proc in reversed(procs):  # the daemon first, so it launches nothing more
        pids = [proc.popen.pid, *descendants(proc.popen.pid, process_table())]
        victims.update({pid: _proc_start(pid) for pid in pids})
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in procs:
        try:
            proc.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        try:
            os.killpg(proc.popen.pid, signal.SIGKILL)  # the session of each is its own group
        except (ProcessLookupError, PermissionError):
            pass
    for pid, started in victims.items():
        if started is not None and _proc_start(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"warning: {proc.name} (pid {proc.popen.pid}) did not exit", file=sys.stderr)


def _wait(
    procs: list[_Process], check: Callable[[], Any], timeout: float, what: str, period: float
) -> Any:
    """Poll `check` until truthy; fail at once if a service died, with its log tail."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            proc.check_alive()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name} ({p.log}):\n{_tail(p.log, 15)}" for p in procs)
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}\n{logs}")
        time.sleep(period)


class Deployment:
    """A running Dagster deployment: code server, webserver and daemon over loopback."""

    def __init__(self, home: Path, python: Path, procs: list[_Process], url: str):
        self.home, self.python, self.procs, self.url = home, python, procs, url
        self.repository = ""

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", body, method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            answer = json.loads(resp.read())
        if answer.get("errors"):
            raise RuntimeError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def wait(self, check: Callable[[], Any], timeout: float, what: str, period: float) -> Any:
        return _wait(self.procs, check, timeout, what, period)

    def submit(self, kind: str) -> str:
        """Launch `hello` via the GraphQL `launchRun` mutation; returns the run ID."""
        params = {
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": self.repository,
                "jobName": JOB,
            },
            "runConfigData": {},
            "executionMetadata": {"tags": [{"key": TAG, "value": kind}]},
        }
        result = self.graphql(LAUNCH_RUN, {"executionParams": params})["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise RuntimeError(f"launchRun failed: {result}")
        return result["run"]["runId"]

    def status(self, run_id: str) -> str:
        result = self.graphql(RUN_STATUS, {"runId": run_id})["runOrError"]
        if result["__typename"] != "Run":
            raise RuntimeError(f"runOrError({run_id}): {result}")
        return result["status"]

    def records(self, run_ids: list[str]) -> dict:
        """Timings of the runs, read from the instance by the Dagster venv's python."""
        env = _env(self.home)
        try:
            proc = subprocess.run(
                [str(self.python), str(SIDE / "records.py")],
                input=json.dumps(run_ids),
                capture_output=True,
                text=True,
                env=env,
                cwd=self.home,
                timeout=RECORDS_TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"reading run records timed out after {RECORDS_TIMEOUT:g} s"
            ) from exc
        if proc.returncode:
            raise RuntimeError(f"records.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout)


LAUNCH_RUN = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
  }
}"""
RUN_STATUS = """
query Status($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { status } ... on Error { message } }
}"""
WORKSPACE = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { repositories { name } }
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message }
  }
}"""
DAEMON = """
query {
  instance { daemonHealth { daemonStatus(daemonType: "QUEUED_RUN_COORDINATOR") {
    healthy lastHeartbeatTime
  } } }
}"""
COUNTS = """
query Counts($tags: [ExecutionTag!]) {
  done: runsOrError(filter: {statuses: [SUCCESS], tags: $tags}) { ... on Runs { count } }
  failed: runsOrError(filter: {statuses: [FAILURE, CANCELED], tags: $tags}) {
    ... on Runs { count results { runId status } }
  }
}"""


def _env(home: Path) -> dict[str, str]:
    """The environment of the Dagster processes: their venv first, none of the main venv's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DAGSTER_HOME")
    }
    env["DAGSTER_HOME"] = str(home)
    env["VIRTUAL_ENV"] = str(VENV)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    # `telemetry.enabled: false` stops the writing of telemetry logs but not the thread that
    # uploads $DAGSTER_HOME/logs to telemetry.dagster.io; this variable stops that thread too.
    env["DAGSTER_DISABLE_TELEMETRY"] = "1"
    return env


def _write_config(home: Path, concurrency: int, grpc_port: int) -> None:
    (home / "dagster.yaml").write_text(
        "run_coordinator:\n"
        "  module: dagster._core.run_coordinator\n"
        "  class: QueuedRunCoordinator\n"
        "  config:\n"
        f"    max_concurrent_runs: {concurrency}\n"
        "run_launcher:\n"
        "  module: dagster._core.launcher\n"
        "  class: DefaultRunLauncher\n"
        "telemetry:\n"
        "  enabled: false\n"
    )
    (home / "workspace.yaml").write_text(
        "load_from:\n"
        "  - grpc_server:\n"
        "      host: 127.0.0.1\n"
        f"      port: {grpc_port}\n"
        f"      location_name: {LOCATION}\n"
    )


@contextmanager
def deployment(concurrency: int = 32) -> Iterator[Deployment]:
    """Start code server, webserver and daemon in a fresh DAGSTER_HOME; stop them all on exit."""
    python = ensure_venv()
    folder = Path(tempfile.mkdtemp(prefix="fleetrun-bench-dagster-"))
    # Not $DAGSTER_HOME/logs: that is Dagster's telemetry folder, whose upload thread (in the
    # webserver and the daemon, whatever `telemetry.enabled` says) moves it away to upload it.
    home, logs = folder / "home", folder / "logs"
    home.mkdir()
    logs.mkdir()
    grpc_port, web_port = _free_ports(2)
    _write_config(home, concurrency, grpc_port)
    env, bin_ = _env(home), VENV / "bin"
    procs: list[_Process] = []
    ok = False
    try:
        procs.append(
            _Process(
                "code server",
                [
                    str(bin_ / "dagster"),
                    "code-server",
                    "start",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(grpc_port),
                    "-f",
                    str(SIDE / "jobs.py"),
                    "-d",
                    str(SIDE),
                    "--location-name",
                    LOCATION,
                ],
                env,
                home,
                logs / "code-server.log",
            )
        )

        def grpc_listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", grpc_port), timeout=1).close()
                return True
            except OSError:
                return False

        _wait(procs, grpc_listening, STARTUP_TIMEOUT, "the code server's port", 0.2)
        procs.append(
            _Process(
                "webserver",
                [
                    str(bin_ / "dagster-webserver"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(web_port),
                    "-w",
                    str(home / "workspace.yaml"),
                ],
                env,
                home,
                logs / "webserver.log",
            )
        )
        dep = Deployment(home, python, procs, f"http://127.0.0.1:{web_port}")

        def server_up() -> bool:
            try:
                with urllib.request.urlopen(f"{dep.url}/server_info", timeout=5) as resp:
                    return resp.status == 200
            except OSError:
                return False

        dep.wait(server_up, STARTUP_TIMEOUT, "the webserver", 0.2)

        def location_loaded() -> str | None:
            workspace = dep.graphql(WORKSPACE)["workspaceOrError"]
            if workspace["__typename"] != "Workspace":
                raise RuntimeError(f"workspace error: {workspace}")
            for entry in workspace["locationEntries"]:
                loaded = entry["locationOrLoadError"]
                if entry["name"] != LOCATION or not loaded:
                    continue
                if loaded["__typename"] == "RepositoryLocation":
                    return loaded["repositories"][0]["name"]
                message = loaded.get("message") or ""
                if "Unreachable" not in message:  # unreachable: still starting; else final
                    raise RuntimeError(
                        f"code location {LOCATION} failed to load: {message}\n"
                        f"--- code server log:\n{_tail(procs[0].log)}"
                    )
            return None

        dep.repository = dep.wait(location_loaded, STARTUP_TIMEOUT, "the code location", 0.5)
        procs.append(
            _Process(
                "daemon",
                [str(bin_ / "dagster-daemon"), "run", "-w", str(home / "workspace.yaml")],
                env,
                home,
                logs / "daemon.log",
            )
        )

        def daemon_up() -> bool:
            status = dep.graphql(DAEMON)["instance"]["daemonHealth"]["daemonStatus"]
            return status["lastHeartbeatTime"] is not None

        dep.wait(daemon_up, STARTUP_TIMEOUT, "the daemon's run-queue heartbeat", 0.5)
        yield dep
        ok = True
    finally:
        _stop(procs)
        if ok:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"Dagster bench: DAGSTER_HOME and logs kept in {folder}", file=sys.stderr)


def idle(dep: Deployment, runs: int) -> tuple[dict[str, list[float]], dict]:
    """N runs one after the other, each waited for; times from t0 just before the POST."""
    t0s: dict[str, float] = {}
    for _ in range(runs):
        t0 = time.time()
        run_id = dep.submit("idle")
        t0s[run_id] = t0

        def ended(rid: str = run_id) -> str | None:
            s = dep.status(rid)
            return s if s in FINISHED else None

        status = dep.wait(ended, RUN_TIMEOUT, f"idle run {run_id}", 0.05)
        if status != "SUCCESS":
            raise RuntimeError(f"idle run {run_id} ended {status}")
    data = dep.records(list(t0s))
    received, started, finished, dequeued = [], [], [], []
    for run_id, t0 in t0s.items():
        run = data["runs"][run_id]
        if run["worker_started_time"] is None:
            raise RuntimeError(f"run {run_id} has no 'Started process for run' event")
        received.append(run["worker_started_time"] - t0)
        started.append(run["start_time"] - t0)
        finished.append(run["end_time"] - t0)
        dequeued.append(run["starting_time"] - t0)
    times = {
        "submit -> launch received": received,
        "submit -> STARTED": started,
        "submit -> SUCCESS": finished,
    }
    return times, {"data": data, "submit -> RUN_STARTING": dequeued}


def burst(dep: Deployment, runs: int) -> dict:
    """M runs submitted at once from 8 threads; runs/s to the last end, and time in queue."""
    t0 = time.time()
    pool = ThreadPoolExecutor(8)
    try:
        ids = list(pool.map(lambda _: dep.submit("burst"), range(runs)))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    submitted = time.time() - t0
    tags = [{"key": TAG, "value": "burst"}]
    progress = {"done": -1, "at": time.monotonic(), "shown": time.monotonic()}

    def all_done() -> bool:
        counts = dep.graphql(COUNTS, {"tags": tags})
        if counts["failed"]["count"]:
            raise RuntimeError(f"burst runs failed: {counts['failed']['results'][:5]}")
        done = counts["done"]["count"]
        if time.monotonic() - progress["shown"] >= 60:  # a long burst says how far it is
            progress["shown"] = time.monotonic()
            print(f"burst: {done}/{runs} finished after {time.time() - t0:.0f} s", file=sys.stderr)
        if done != progress["done"]:
            progress.update(done=done, at=time.monotonic())
        elif time.monotonic() - progress["at"] > BURST_STALL_TIMEOUT:
            raise TimeoutError(
                f"burst stalled: {done}/{runs} finished, none in the last {BURST_STALL_TIMEOUT:g} s"
            )
        return done >= runs

    dep.wait(all_done, BURST_TIMEOUT_PER_RUN * runs + 300, f"the burst of {runs} runs", 1.0)
    data = dep.records(ids)
    records = [data["runs"][run_id] for run_id in ids]
    bad = [r for r in records if r is None or r["status"] != "SUCCESS"]
    if bad:
        raise RuntimeError(f"{len(bad)} burst runs did not succeed: {bad[:3]}")
    elapsed = max(r["end_time"] for r in records) - t0
    # Peak of runs in flight (dequeued, not yet ended): how much of max_concurrent_runs was used.
    edges = sorted(
        [(r["starting_time"], 1) for r in records] + [(r["end_time"], -1) for r in records]
    )
    in_flight = peak = 0
    for _, step in edges:
        in_flight += step
        peak = max(peak, in_flight)
    return {
        "runs_per_s": runs / elapsed,
        "queue_s": [r["starting_time"] - r["create_time"] for r in records],
        "runs": runs,
        "elapsed_s": elapsed,
        "submit_s": submitted,
        "peak_in_flight": peak,
        # RUN_STARTING -> "Started process for run": how long the daemon's launch call blocks.
        "launch_s": [r["worker_started_time"] - r["starting_time"] for r in records],
    }


def measure(idle_runs: int = 100, burst_runs: int = 1000, concurrency: int = 32) -> dict:
    """Returns {"version": "1.13.28", "idle": {"submit -> launch received": [s...],
    "submit -> STARTED": [s...], "submit -> SUCCESS": [s...]}, "burst": {"runs_per_s": float,
    "queue_s": [s...], "runs": M}}; times in seconds.

    Also "deployment" (the run-queue settings in effect, read from the instance) and "extra"
    (idle submit -> RUN_STARTING; the burst's elapsed and submission seconds, its peak of runs
    in flight and per-run RUN_STARTING -> launch received, the time a launch blocks the daemon).
    """
    with deployment(concurrency) as dep:
        idle_times, idle_extra = idle(dep, idle_runs)
        burst_result = burst(dep, burst_runs)
    settings = {k: v for k, v in idle_extra["data"].items() if k != "runs"}
    return {
        "version": VERSION,
        "idle": idle_times,
        "burst": {k: burst_result[k] for k in ("runs_per_s", "queue_s", "runs")},
        "deployment": settings,
        "extra": {
            "idle submit -> RUN_STARTING": idle_extra["submit -> RUN_STARTING"],
            "burst elapsed_s": burst_result["elapsed_s"],
            "burst submit_s": burst_result["submit_s"],
            "burst peak_in_flight": burst_result["peak_in_flight"],
            "burst RUN_STARTING -> launch received": burst_result["launch_s"],
        },
    }


def _sigterm(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # so the deployment's finally stops every process


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100, help="idle runs")
    parser.add_argument("--burst", type=int, default=1000, help="runs in the burst")
    parser.add_argument("--concurrency", type=int, default=32, help="max_concurrent_runs")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    began = time.monotonic()
    try:
        result = measure(args.runs, args.burst, args.concurrency)
    except KeyboardInterrupt:
        sys.exit("interrupted: the Dagster processes were stopped")
    wall = time.monotonic() - began
    dep = result["deployment"]
    print(
        f"Dagster {result['version']}: {dep['run_coordinator']} (dequeue every "
        f"{dep['dequeue_interval_seconds']} s, threads {dep['dequeue_use_threads']}, "
        f"max_concurrent_runs {dep['max_concurrent_runs']}), {dep['run_launcher']}"
    )
    print(f"idle: one-op job, {args.runs} sequential runs (ms)")
    print(f"  {'measure':<28}{'p50':>8}{'p99':>8}{'max':>8}")
    rows = {
        **result["idle"],
        "(submit -> RUN_STARTING)": result["extra"]["idle submit -> RUN_STARTING"],
    }
    for name, values in rows.items():
        ms = [v * 1000 for v in values]
        print(f"  {name:<28}{statistics.median(ms):>8.1f}{_pct(ms, 0.99):>8.1f}{max(ms):>8.1f}")
    b = result["burst"]
    ms = [w * 1000 for w in b["queue_s"]]
    print(f"burst: {b['runs']} one-op runs at once, max_concurrent_runs {args.concurrency}")
    print(
        f"  throughput {b['runs_per_s']:.2f} runs/s ({result['extra']['burst elapsed_s']:.0f} s,"
        f" submitted in {result['extra']['burst submit_s']:.1f} s); time in queue p50"
        f" {statistics.median(ms):.0f} ms, p99 {_pct(ms, 0.99):.0f} ms"
    )
    extra = result["extra"]
    launch = [v * 1000 for v in extra["burst RUN_STARTING -> launch received"]]
    print(
        f"  peak runs in flight {extra['burst peak_in_flight']}; the daemon's launch call"
        f" (RUN_STARTING -> launch received) p50 {statistics.median(launch):.0f} ms,"
        f" p99 {_pct(launch, 0.99):.0f} ms"
    )
    print(f"wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
