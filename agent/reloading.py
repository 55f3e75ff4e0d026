"""Code locations as this agent serves them, and reloading them without a restart.

A reload is asked for when a local location's files change (watched with watchfiles),
on a git location's update interval, when the control plane says so (`fleetrun agents
reload`), and on SIGHUP. Those only put requests on `AgentState.reloads`; one consumer
(`reload_forever`) carries them out one at a time, so nothing else needs a lock: make
the newest version's folder (agent/codeversions.py), describe it in a throwaway worker,
and if it loads, serve it. New runs, schedule ticks and sensors use it from then on;
runs already going keep theirs. A version that does not load leaves the last good one
serving, and the error is reported (`reload_error`) until a good version arrives. Each
change is sent to the control plane (`UpdateLocations`) by `publish_forever`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
from dataclasses import dataclass, replace

from agent.channel import existing_channels
from agent.client import ControlPlaneError, ControlPlaneUnreachable, RetryDelays
from agent.codeversions import (
    CodeFetchError,
    LocationVersion,
    clear_temporaries,
    code_folder,
    in_skipped_dir,
    make_version,
    mark_state_dir,
    prune,
    remove_version,
    version_of,
    versions_held,
)
from agent.config import CodeLocationConfig
from agent.launchers import describe_location
from agent.state import REQUEST_TIMEOUT_SECONDS, AgentState, ServedLocation
from protocol.messages import CodeLocationInfo, LaunchRun, LocationsUpdated, UpdateLocations
from protocol.tags import CODE_VERSION_TAG
from protocol.validation import MAX_CODE_VERSIONS

log = logging.getLogger("fleetrun.agent")

PRUNE = "prune"  # a request only to remove versions no run uses any more
WATCH_DEBOUNCE_MS = 300


@dataclass(frozen=True)
class VersionChoice:
    """The version a launch runs: with a note for its event log, or a refusal."""

    version: LocationVersion | None
    note: str | None = None
    refusal: str | None = None


def choose_version(
    location: str,
    current: LocationVersion | None,
    launch: LaunchRun,
    held: dict[str, LocationVersion],
    agent_name: str,
) -> VersionChoice:
    """Which version of `location` a launch runs: the one its `fleetrun/code_version`
    tag pins (or none: the run cannot go here), else the one the launch asks for (a
    re-execution's parent's) if this agent still has it, else the current one."""
    pinned = launch.tags.get(CODE_VERSION_TAG)
    if pinned:
        if pinned in held:
            return VersionChoice(held[pinned])
        return VersionChoice(
            None,
            refusal=f"agent {agent_name} does not have version {pinned} of code location "
            f"{location} (tag {CODE_VERSION_TAG})",
        )
    if current is None:
        return VersionChoice(
            None, refusal=f"code location {location} has no version that loads on {agent_name}"
        )
    wanted = launch.code_version
    if not wanted or wanted == current.version:
        return VersionChoice(current)
    if wanted in held:
        return VersionChoice(
            held[wanted], note=f"runs code version {wanted} of {location}, as its parent run did"
        )
    return VersionChoice(
        current,
        note=f"code version {wanted} of {location} (its parent run's) is no longer on agent "
        f"{agent_name}: runs the current version {current.version}",
    )


def held_versions(agent: AgentState, name: str) -> dict[str, LocationVersion]:
    served = agent.code.get(name)
    if served is None:
        return {}
    state_dir = agent.config.state_dir
    found = {}
    for version in versions_held(state_dir, name):
        loaded = version_of(served.config, state_dir, version)
        if loaded is not None:
            found[version] = loaded
    return found


def location_infos(agent: AgentState) -> list[CodeLocationInfo]:
    """What the control plane is told about each location: its definitions, the version
    serving, every version held (current first), and a failed reload's error."""
    infos = []
    for name, served in agent.code.items():
        held = versions_held(agent.config.state_dir, name)
        if served.current is not None:
            current = served.current.version
            held = [current, *(v for v in held if v != current)]
        infos.append(replace(served.info, versions=held[:MAX_CODE_VERSIONS]))
    return infos


def request_reload(agent: AgentState, names: list[str] | None, why: str) -> list[str]:
    """Ask for a reload of these locations (None or empty: all); the names it takes
    (unknown ones are left out)."""
    wanted = [n for n in names if n in agent.code] if names else list(agent.code)
    for name in wanted:
        agent.reloads.put_nowait((name, why))
    return wanted


async def load_all(agent: AgentState) -> None:
    """The first load of every location, at start (before registering)."""
    mark_state_dir(agent.config.state_dir)
    for name in agent.code:
        clear_temporaries(agent.config.state_dir, name)
    await asyncio.gather(*(reload_location(agent, name, "start") for name in agent.code))


async def reload_location(agent: AgentState, name: str, why: str) -> bool:
    """Make, describe and (if it loads) serve the location's newest version; whether
    what the control plane knows of it changed."""
    served = agent.code[name]
    loc, state_dir = served.config, agent.config.state_dir
    try:
        version = await make_version(loc, state_dir)
    except CodeFetchError as exc:
        return _failed(served, str(exc))
    except OSError as exc:  # the state dir: not writable, full
        return _failed(served, f"cannot make a version folder in {state_dir}: {exc}")
    current = served.current
    if current is not None and version == current.version:
        if served.info.reload_error is None:
            return False
        log.info("code location %s: back to version %s, which serves", name, version)
        served.info = replace(served.info, reload_error=None)
        return True
    candidate = version_of(loc, state_dir, version)
    if candidate is None:
        return _failed(served, f"version {version} vanished while it was loaded")
    info = await describe_location(candidate, agent.launcher.tracking)
    if info.error is not None:
        if version not in _in_use(agent, name):
            remove_version(state_dir, name, version)
        return _failed(served, f"version {version}: {info.error}")
    served.current = candidate
    served.info = replace(info, version=version)
    log.info(
        "code location %s: version %s serves (%s): jobs %s",
        name,
        version,
        why,
        [j.name for j in info.jobs],
    )
    prune_versions(agent, name)
    return True


def _failed(served: ServedLocation, error: str) -> bool:
    """A version that did not load: the last good one goes on serving, with the error."""
    name = served.config.name
    if served.current is None:
        log.error("code location %s failed to load: %s", name, error)
        served.info = CodeLocationInfo(name=name, error=error)
    else:
        log.error(
            "code location %s: reload failed, version %s goes on serving: %s",
            name,
            served.current.version,
            error,
        )
        served.info = replace(served.info, reload_error=error)
    return True


def _in_use(agent: AgentState, name: str) -> set[str]:
    """The versions of location `name` that this agent's runs use (those it follows,
    and those whose channels wait for it to adopt them at start), and the current one."""
    used = {
        active.worker.code_version
        for active in agent.runs.values()
        if active.worker.launch.location == name and active.worker.code_version
    }
    for channel in existing_channels(agent.config.state_dir):
        version = channel.code_version()
        if version and version not in used:
            try:
                if channel.launch().location == name:
                    used.add(version)
            except (OSError, ValueError):  # unreadable: adoption removes it
                continue
    current = agent.code[name].current
    if current is not None:
        used.add(current.version)
    return used


def prune_versions(agent: AgentState, name: str) -> bool:
    """Remove the versions of `name` that are not current, not used by a run and not
    among the `keep_versions` newest others; whether any went."""
    served = agent.code[name]
    removed = prune(agent.config.state_dir, name, _in_use(agent, name), served.config.keep_versions)
    if removed:
        log.info("code location %s: removed old versions %s", name, ", ".join(removed))
    return bool(removed)


async def reload_forever(agent: AgentState) -> None:
    """Carry out reload requests, one location at a time (requests that piled up for
    the same location meanwhile count once)."""
    while True:
        wanted = [await agent.reloads.get()]
        while not agent.reloads.empty():
            wanted.append(agent.reloads.get_nowait())
        reasons: dict[str, str] = {}
        for name, why in wanted:
            if why != PRUNE or name not in reasons:
                reasons[name] = why
        changed = False
        for name, why in reasons.items():
            try:
                if why == PRUNE:
                    changed = prune_versions(agent, name) or changed
                else:
                    changed = await reload_location(agent, name, why) or changed
            except Exception:
                log.exception("code location %s: reload failed", name)
        if changed:
            agent.catalog_changed.set()


async def publish_forever(agent: AgentState) -> None:
    """Send the control plane each change of this agent's locations (once registered;
    registering sends them too), retrying while it cannot be reached."""
    delays = RetryDelays()
    while True:
        await agent.catalog_changed.wait()
        agent.catalog_changed.clear()
        if agent.agent_id is None:  # registering: send it again once registered
            await asyncio.sleep(1.0)
            agent.catalog_changed.set()
            continue
        message = UpdateLocations(agent_id=agent.agent_id, code_locations=location_infos(agent))
        try:
            await agent.client.call("locations", message, LocationsUpdated, REQUEST_TIMEOUT_SECONDS)
            delays.reset()
        except ControlPlaneUnreachable as exc:
            agent.contact.failed("locations", exc)
            agent.catalog_changed.set()
            await asyncio.sleep(delays.next_delay())
        except ControlPlaneError as exc:
            log.error("the control plane refused this agent's code locations: %s", exc)


def _watched(agent: AgentState) -> dict[str, list[CodeLocationConfig]]:
    """The folders to watch, each with the local locations whose code is in it."""
    folders: dict[str, list[CodeLocationConfig]] = {}
    for served in agent.code.values():
        loc = served.config
        if not loc.git and loc.watch and os.path.isdir(code_folder(loc)):
            folders.setdefault(os.path.abspath(code_folder(loc)), []).append(loc)
    return folders


def _touches(loc: CodeLocationConfig, path: str, state_dir: str) -> bool:
    """Whether a changed `path` is one of `loc`'s code files."""
    folder = os.path.abspath(code_folder(loc))
    if not path.startswith(folder + os.sep) or path.startswith(state_dir + os.sep):
        return False
    name = os.path.basename(path)
    if not any(fnmatch.fnmatch(name, pattern) for pattern in loc.include):
        return False
    return not in_skipped_dir(folder, path)


def _changed(locations: list[CodeLocationConfig], paths: set[str], state_dir: str) -> list[str]:
    """The locations whose code files are among the changed `paths`."""
    state_dir = os.path.abspath(state_dir)
    changed = {os.path.abspath(path) for path in paths}
    return [
        loc.name for loc in locations if any(_touches(loc, path, state_dir) for path in changed)
    ]


async def watch_forever(agent: AgentState) -> None:
    """Ask for a reload of each local location whose code files change."""
    from watchfiles import awatch

    folders = _watched(agent)
    if not folders:
        await asyncio.Event().wait()  # nothing to watch: wait for the end
    locations = [loc for locs in folders.values() for loc in locs]
    while True:
        try:
            async for changes in awatch(
                *folders, debounce=WATCH_DEBOUNCE_MS, step=50, recursive=True
            ):
                paths = {path for _, path in changes}
                names = _changed(locations, paths, agent.config.state_dir)
                if names:
                    request_reload(agent, names, "its files changed")
        except (OSError, RuntimeError) as exc:
            log.error("cannot watch code locations' files (%s); retrying in 10 s", exc)
            await asyncio.sleep(10)


async def update_git_forever(agent: AgentState, name: str, interval: float) -> None:
    """Ask for a git location's update every `interval` seconds."""
    while True:
        await asyncio.sleep(interval)
        request_reload(agent, [name], "update interval")


def code_tasks(agent: AgentState) -> list[asyncio.Task[None]]:
    """The reload activity's tasks: the consumer, the publisher, the watcher and one
    timer per git location that updates on an interval."""
    tasks = [
        asyncio.create_task(reload_forever(agent), name="code-reload"),
        asyncio.create_task(publish_forever(agent), name="code-publish"),
        asyncio.create_task(watch_forever(agent), name="code-watch"),
    ]
    for served in agent.code.values():
        loc = served.config
        if loc.git and loc.update_interval_seconds > 0:
            tasks.append(
                asyncio.create_task(
                    update_git_forever(agent, loc.name, loc.update_interval_seconds),
                    name=f"code-update-{loc.name}",
                )
            )
    return tasks


def current_version(agent: AgentState, name: str) -> LocationVersion | None:
    served = agent.code.get(name)
    return None if served is None else served.current
