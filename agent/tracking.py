"""Process tracking: every process a worker starts ends when the worker has ended.

Chosen once at agent start (`process_tracking` in agent.toml) and logged:

- **cgroup**, where a writable cgroup v2 is found: each worker gets a cgroup of its own,
  `<agent's cgroup>/fleetrun-<agent pid>/run-<lease>`, and joins it before it runs user
  code or forks, so all it starts is born inside. When the worker has exited, what is
  still inside is killed at once (`cgroup.kill`) and the cgroup removed. No controller
  is enabled: the agent's own cgroup holds processes, so its children may have none.
- **sweep**, the fallback: the worker is a child subreaper, so daemons that `setsid` and
  double-fork stay its descendants, and it kills them before it exits. The agent then
  kills what is left in the worker's process group or carries the worker's marker in
  its environment (a run's FLEETRUN_RUN_ID and FLEETRUN_LEASE): that also covers a
  worker SIGKILLed before it could sweep. What left the group without the marker (a
  fresh environment, or only forked from a fork-server worker, never exec'd) escapes
  if its worker was SIGKILLed; only a cgroup holds that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Protocol

from agent.channel import WorkerIdentity
from agent.processes import (
    CGROUP_ENV,
    SUBREAPER_ENV,
    LeftProcess,
    cgroup_populated,
    cgroup_problem,
    kill_cgroup,
    kill_left_behind,
    own_cgroup_dir,
    remove_cgroup,
)

log = logging.getLogger("fleetrun.agent")

EMPTY_TIMEOUT_SECONDS = 5.0  # for a killed cgroup to empty (a process in D state lingers)
EMPTY_POLL_SECONDS = 0.01


class ProcessScope(Protocol):
    """The processes of one worker: what it must inherit to be tracked, and their end."""

    tracking: str
    env: dict[str, str]  # added to the worker's environment

    async def end(self, worker_pid: int | None) -> list[LeftProcess]:
        """SIGKILL what is still running once the worker has exited; what was killed.
        `worker_pid` is None if the worker never started."""
        ...


class Tracking(Protocol):
    """How this agent tracks the processes of its workers (one per agent)."""

    name: str

    def scope(self, label: str, marker: Mapping[str, str]) -> ProcessScope:
        """A scope for one worker, before it starts; `marker` goes into its environment.
        Raises OSError if it cannot be set up."""
        ...

    def describe(self) -> str: ...

    async def close(self) -> None:
        """End whatever the agent's scopes still hold (the agent is exiting)."""
        ...


class SweepScope:
    tracking = "sweep"

    def __init__(self, marker: Mapping[str, str]) -> None:
        self.marker = dict(marker)
        self.env = {**self.marker, SUBREAPER_ENV: "1"}

    async def end(self, worker_pid: int | None) -> list[LeftProcess]:
        if worker_pid is None:
            return []
        try:
            return await asyncio.to_thread(kill_left_behind, worker_pid, self.marker)
        except OSError as exc:
            log.error("cannot sweep what worker %d left: %s", worker_pid, exc)
            return []


class SweepTracking:
    """The worker's process group, its subreaper sweep, and an environment-marker sweep."""

    name = "sweep"

    def __init__(self, reason: str = "") -> None:
        self.reason = reason

    def scope(self, label: str, marker: Mapping[str, str]) -> SweepScope:
        return SweepScope(marker)

    def describe(self) -> str:
        how = "process groups, a subreaper and a /proc sweep"
        return f"sweep ({how}; {self.reason})" if self.reason else f"sweep ({how})"

    async def close(self) -> None:
        return None


async def _emptied(path: str) -> bool:
    """Whether the killed cgroup at `path` empties within EMPTY_TIMEOUT_SECONDS."""
    deadline = time.monotonic() + EMPTY_TIMEOUT_SECONDS
    while cgroup_populated(path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(EMPTY_POLL_SECONDS)
    return True


async def _end_cgroup(path: str, spare: int | None) -> list[LeftProcess]:
    """Kill everything in the cgroup at `path`, wait until it is empty, remove it."""
    try:
        killed = await asyncio.to_thread(kill_cgroup, path, spare)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.error("cannot kill the processes of cgroup %s: %s", path, exc)
        return []
    if not await _emptied(path):
        log.warning(
            "cgroup %s still holds processes %.0f s after cgroup.kill; left in place",
            path,
            EMPTY_TIMEOUT_SECONDS,
        )
        return killed
    try:
        remove_cgroup(path)
    except OSError as exc:
        log.warning("cannot remove cgroup %s: %s", path, exc)
    return killed


class CgroupScope:
    tracking = "cgroup"

    def __init__(self, path: str, marker: Mapping[str, str]) -> None:
        self.path = path
        self.env = {**marker, CGROUP_ENV: path}

    async def end(self, worker_pid: int | None) -> list[LeftProcess]:
        return await _end_cgroup(self.path, worker_pid)


class CgroupTracking:
    """A cgroup v2 per worker, under `base` (this agent's own folder of cgroups)."""

    name = "cgroup"

    def __init__(self, base: str) -> None:
        self.base = base

    def scope(self, label: str, marker: Mapping[str, str]) -> CgroupScope:
        for n in itertools.count(1):
            path = os.path.join(self.base, label if n == 1 else f"{label}.{n}")
            try:
                os.mkdir(path)
            except FileExistsError:
                continue  # one that could not be removed yet
            return CgroupScope(path, marker)
        raise AssertionError("unreachable")

    def describe(self) -> str:
        return f"cgroup (a cgroup v2 per worker under {self.base})"

    async def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.base):
                if entry.is_dir():
                    killed = await _end_cgroup(entry.path, None)
                    if killed:
                        log.warning(
                            "killed %d process(es) still in %s as the agent exits",
                            len(killed),
                            entry.path,
                        )
        with contextlib.suppress(OSError):
            os.rmdir(self.base)


def tracking_choice(setting: str, cgroup_problem: str | None) -> tuple[str, str]:
    """The tracking to use for a `process_tracking` setting, and why if it is not what
    was asked for. `cgroup_problem`: why no cgroup v2 is usable here (None: one is).
    Raises ValueError when "cgroup" was asked for and none is usable."""
    if setting == "sweep":
        return "sweep", ""
    if cgroup_problem is None:
        return "cgroup", ""
    if setting == "cgroup":
        raise ValueError(f'"cgroup" needs a writable cgroup v2: {cgroup_problem}')
    return "sweep", f"no usable cgroup v2: {cgroup_problem}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's
    return True


def _remove_stale(parent: str) -> None:
    """Remove the cgroups that agents killed outright left in `parent`, once empty. One
    still holding processes (the workers of a dead agent run on) is left, and said."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            match = re.fullmatch(r"fleetrun-(\d+)", entry.name)
            if match is None or not entry.is_dir() or _alive(int(match.group(1))):
                continue
            try:
                remove_cgroup(entry.path)
            except OSError as exc:
                log.warning(
                    "cgroup %s of an agent that is gone: %s; left in place",
                    entry.path,
                    exc.strerror,
                )


def _agent_cgroups() -> tuple[str | None, str | None]:
    """This agent's folder of cgroups, created and probed; else None and why not."""
    parent = own_cgroup_dir()
    if parent is None:
        return None, "no cgroup2 file system shows this process's cgroup"
    _remove_stale(parent)
    base = os.path.join(parent, f"fleetrun-{os.getpid()}")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError as exc:
        return None, f"cannot create a cgroup in {parent}: {exc.strerror}"
    problem = cgroup_problem(base)
    if problem is not None:
        with contextlib.suppress(OSError):
            os.rmdir(base)
        return None, problem
    return base, None


def open_tracking(setting: str) -> Tracking:
    """The process tracking for `setting` ("auto", "cgroup" or "sweep"), logged once.
    Raises ValueError when "cgroup" is asked for and this machine has none usable."""
    base, problem = (None, None) if setting == "sweep" else _agent_cgroups()
    name, reason = tracking_choice(setting, problem)
    tracking: Tracking = SweepTracking(reason)
    if name == "cgroup":
        assert base is not None
        tracking = CgroupTracking(base)
    log.info("process tracking: %s", tracking.describe())
    return tracking


def adopted_scope(identity: WorkerIdentity, marker: Mapping[str, str]) -> ProcessScope:
    """The scope of a worker that a previous life of this agent started: its cgroup if
    it has one (under that agent's folder, left in place because it still held the
    worker), else the sweep by its marker."""
    if identity.cgroup:
        return CgroupScope(identity.cgroup, marker)
    return SweepScope(marker)
