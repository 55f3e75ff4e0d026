"""The docker executor: each step attempt in a container of its own, up to N at once.

It is the multiprocess executor (same scheduling, step retries, events, compute logs
and output passing) with a container where that one forks a child. The agent gives
the run worker, in its spec, the body of a step container: the run's image and limits,
its mounts (the run's channel folder among them), network, environment and labels
(agent/containers.py). For each attempt the worker makes a folder in the run's scratch
holding the attempt (`step`: the step, its inputs, pickled) and three FIFOs in place of
the child's pipes (stdout, stderr, result), and starts the container with the worker's
`step` mode (agent/worker/main.py). A thread per container waits for its exit through
the Docker API and then wakes the scheduler, which reads what is left, removes the
container and settles the attempt.

The worker reaches Docker on the socket the agent names: a run worker in a container
needs that socket mounted (`[docker] mounts`).
"""

from __future__ import annotations

import codecs
import contextlib
import http.client
import itertools
import json
import os
import pickle
import selectors
import shutil
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

from agent.sdk import Node
from agent.worker.executors.execution import Execution
from agent.worker.executors.multiprocess import _Running, _Scheduler
from agent.worker.executors.step import StepAttempt, emit_start, error_data

STEP_DIR_ENV = "FLEETRUN_STEP_DIR"
LABEL_STEP = "fleetrun.step"
STREAMS = ("stdout", "stderr", "result")
STOP_GRACE_SECONDS = 5.0  # below the agent's own grace for the run
API_TIMEOUT_SECONDS = 60.0


class EngineError(Exception):
    """Docker refused a call, or could not be reached."""


class Engine:
    """The few calls of the Docker Engine API the executor makes, over its Unix socket
    (blocking: the worker's scheduler is synchronous)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def call(
        self, method: str, path: str, body: Any = None, timeout: float | None = API_TIMEOUT_SECONDS
    ) -> Any:
        conn = _UnixConnection(self.path, timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, data, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
        except OSError as exc:
            raise EngineError(f"Docker does not answer at {self.path}: {exc}") from None
        finally:
            conn.close()
        decoded = json.loads(raw) if raw.strip().startswith((b"{", b"[")) else None
        if resp.status >= 400:
            message = decoded.get("message") if isinstance(decoded, dict) else raw.decode()
            raise EngineError(f"Docker: {message}")
        return decoded

    def create(self, body: dict[str, Any]) -> str:
        return str(self.call("POST", "/containers/create", body)["Id"])

    def start(self, container: str) -> None:
        self.call("POST", f"/containers/{container}/start")

    def wait(self, container: str) -> int:
        result = self.call("POST", f"/containers/{container}/wait", timeout=None)
        return int(result.get("StatusCode", -1))

    def oom_killed(self, container: str) -> bool:
        state = self.call("GET", f"/containers/{container}/json").get("State", {})
        return bool(state.get("OOMKilled"))

    def kill(self, container: str, signal_name: str) -> None:
        query = urllib.parse.urlencode({"signal": signal_name})
        with contextlib.suppress(EngineError):
            self.call("POST", f"/containers/{container}/kill?{query}")

    def remove(self, container: str) -> None:
        with contextlib.suppress(EngineError):
            self.call("DELETE", f"/containers/{container}?force=1")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass
class _Container:
    """One step attempt's container, its folder, and its end once the waiter saw it."""

    id: str
    folder: str
    memory_mb: int
    exit_code: int | None = None
    oom_killed: bool = False
    ended: bool = False

    def died(self) -> StepAttempt:
        if self.oom_killed:
            limit = f"its memory limit of {self.memory_mb} MB" if self.memory_mb else "memory"
            how = f"was killed for exceeding {limit} (out of memory)"
        elif self.exit_code is None:
            how = "ended, its exit code unknown"
        else:
            how = f"exited with code {self.exit_code}"
        message = f"step container {self.id[:12]} {how} before finishing the step"
        return StepAttempt(
            False,
            error={
                "error_type": "StepContainerDied",
                "message": message,
                "traceback": "",
                "exit_code": self.exit_code,
                "oom_killed": self.oom_killed,
            },
        )


class _DockerScheduler(_Scheduler):
    def __init__(self, execution: Execution) -> None:
        super().__init__(execution)
        spec = execution.spec
        settings = spec.docker if spec is not None else {}
        if not settings:
            raise ValueError("the docker executor needs its agent's [docker] settings")
        self.settings = settings
        self.engine = Engine(settings["socket"])
        self.folder = os.path.join(settings["scratch"], "steps")
        self.containers: dict[int, _Container] = {}
        self.tokens = itertools.count(1)

    def start(self, name: str, retry_number: int) -> None:
        node = self.job.nodes[name]
        emit_start(self.sink, name, retry_number)
        token = next(self.tokens)
        folder = os.path.join(self.folder, f"{token}-{name}-{retry_number}")
        try:
            reads = self._prepare(folder, node, retry_number)
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as exc:
            shutil.rmtree(folder, ignore_errors=True)
            self.settle(name, retry_number, StepAttempt(False, error=error_data(exc)))
            return
        try:
            container = self._launch(folder, name)
        except EngineError as exc:
            for fd in reads:
                os.close(fd)
            shutil.rmtree(folder, ignore_errors=True)
            self.settle(name, retry_number, StepAttempt(False, error=error_data(exc)))
            return
        self.containers[token] = container
        exit_read, exit_write = os.pipe()
        threading.Thread(
            target=self._wait, args=(container, exit_write), name=f"wait-{token}", daemon=True
        ).start()
        fds = dict(zip(reads, STREAMS, strict=True))
        fds[exit_read] = "exit"
        decoders = {fd: _decoder() for fd in reads[:2]}
        running = _Running(node, retry_number, token, fds, decoders)
        self.running[token] = running
        for fd in fds:
            self.by_fd[fd] = running
            self.selector.register(fd, selectors.EVENT_READ)

    def _prepare(self, folder: str, node: Node, retry_number: int) -> list[int]:
        """The attempt's folder: its FIFOs (ours opened read-write, so that they never
        read as ended before the container opens them) and its `step` file."""
        os.makedirs(folder, mode=0o700)
        reads = []
        try:
            for stream in STREAMS:
                path = os.path.join(folder, stream)
                os.mkfifo(path, 0o600)
                reads.append(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
            spec = self.execution.spec
            assert spec is not None
            attempt = {
                "location": spec.location,
                "launch": self.execution.launch,
                "step": node.name,
                "retry_number": retry_number,
                "inputs": [self.outputs[u] for u in node.upstream],
                "max_output_bytes": self.execution.max_output_bytes,
            }
            with open(os.path.join(folder, "step"), "wb") as fh:
                pickle.dump(attempt, fh, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:
            for fd in reads:
                os.close(fd)
            raise
        return reads

    def _launch(self, folder: str, step: str) -> _Container:
        body = json.loads(json.dumps(self.settings["container"]))
        body["Cmd"] = [*self.settings["worker_command"], "step"]
        body["Env"] = [*body.get("Env", []), f"{STEP_DIR_ENV}={folder}"]
        body["Labels"] = {**body.get("Labels", {}), LABEL_STEP: step}
        container = self.engine.create(body)
        try:
            self.engine.start(container)
        except EngineError:
            self.engine.remove(container)
            raise
        return _Container(container, folder, int(self.settings.get("memory_mb") or 0))

    def _wait(self, container: _Container, wake: int) -> None:
        """In a thread: until the container has exited; then wake the scheduler."""
        try:
            while True:
                try:
                    container.exit_code = self.engine.wait(container.id)
                    container.oom_killed = self.engine.oom_killed(container.id)
                    break
                except EngineError as exc:
                    if "No such container" in str(exc):
                        break
                    time.sleep(1.0)
        finally:
            container.ended = True
            os.write(wake, b"x")
            os.close(wake)

    def finish(self, running: _Running) -> None:
        self.drain(running)
        del self.running[running.pid]
        container = self.containers.pop(running.pid)
        self.engine.remove(container.id)
        shutil.rmtree(container.folder, ignore_errors=True)
        self.conclude(running, container.died)

    def stop_children(self) -> None:
        """Leaving early (interrupted): SIGTERM each step container, up to
        STOP_GRACE_SECONDS for them to end, then remove them all."""
        for container in self.containers.values():
            self.engine.kill(container.id, "SIGTERM")
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and not all(c.ended for c in self.containers.values()):
            time.sleep(0.05)
        for container in self.containers.values():
            self.engine.remove(container.id)
            shutil.rmtree(container.folder, ignore_errors=True)
        self.containers.clear()
        for running in list(self.running.values()):
            for fd in list(running.fds):
                self.close(running, fd)
        self.running.clear()
        self.selector.close()


def _decoder() -> Any:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


def execute_docker(execution: Execution) -> list[str]:
    """Run each step attempt in a container; returns the names of the steps that failed."""
    return _DockerScheduler(execution).run()


def run_step(folder: str) -> int:
    """A step container's process (`python -m agent.worker step`): one attempt of one
    step, as a multiprocess child runs it, reporting on the FIFOs in `folder`."""
    from agent.worker.code_location import load_definitions
    from agent.worker.executors.multiprocess import _child
    from agent.worker.outputs import encode_output

    flags = os.O_WRONLY | os.O_CLOEXEC
    out, err, result = (os.open(os.path.join(folder, name), flags) for name in STREAMS)
    with open(os.path.join(folder, "step"), "rb") as fh:
        attempt = pickle.load(fh)
    os.dup2(err, 2)  # a code location that fails to load says why in the step's log
    node = (
        load_definitions(attempt["location"]).get_job(attempt["launch"].job).nodes[attempt["step"]]
    )
    limit = attempt["max_output_bytes"]
    _child(
        node,
        attempt["inputs"],
        attempt["launch"],
        lambda step, value: encode_output(step, value, limit),
        attempt["retry_number"],
        (out, err, result),
    )
    return 0  # not reached: _child exits
