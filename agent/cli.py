"""`fleetrun-agent`: the agent binary's commands (run, check-config, version)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from protocol import FLEETRUN_VERSION, PROTOCOL_VERSION
from protocol.logs import FORMATS, configure_logging, set_agent_name
from protocol.schema import ConfigError

if TYPE_CHECKING:
    from agent.config import AgentConfig, CodeLocationConfig
    from agent.connection_check import TokenState
    from agent.tracking import Tracking
    from protocol.messages import CodeLocationInfo


async def _run_agent(config_path: str, handoff: bool = False) -> int:
    from agent.client import read_token
    from agent.config import load_agent_config
    from agent.tracking import open_tracking

    config = load_agent_config(config_path)
    set_agent_name(config.name)
    try:
        token = read_token(config.token_file)
    except OSError as exc:
        print(
            f"fleetrun-agent: cannot read token_file {config.token_file}: {exc.strerror}",
            file=sys.stderr,
        )
        return 2
    try:
        tracking = open_tracking(config.process_tracking)
    except ValueError as exc:
        raise ConfigError(f"{config_path}: process_tracking: {exc}") from None
    try:
        return await _serve(config, token, tracking, handoff)
    finally:
        if not handoff:  # a hand-over leaves the workers' processes to the next start
            await tracking.close()


async def _serve(
    config: AgentConfig, token: str | None, tracking: Tracking, handoff: bool = False
) -> int:
    """Run the agent until a signal stops it; exit 1 if the control plane refuses it."""
    from agent.client import ControlPlaneClient
    from agent.errors import FatalAgentError
    from agent.lifecycle import Agent

    client = ControlPlaneClient(
        config.control_plane_url, token, token_file=config.token_file, ca_file=config.ca_file
    )
    async with client:
        agent = Agent(config, client, tracking, handoff)
        task = asyncio.create_task(agent.run())
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            """First SIGTERM/SIGINT: drain and exit 0. A second one: stop at once."""
            if agent.shutting_down.is_set():
                task.cancel()
            else:
                agent.shutting_down.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGHUP, agent.reload)
        try:
            await task
        except asyncio.CancelledError:
            logging.getLogger("fleetrun.agent").info("agent stopped")
            return 0
        except FatalAgentError as exc:
            print(f"fleetrun-agent: {exc}", file=sys.stderr)
            return 1
    return 0


def run_agent(config_path: str, log_format: str | None = None, handoff: bool = False) -> int:
    """Run an agent until SIGTERM/SIGINT; exit code 2 on a bad config file. With
    `handoff`, SIGTERM leaves the running workers to the next start instead of draining."""
    configure_logging(log_format)
    try:
        return asyncio.run(_run_agent(config_path, handoff))
    except ConfigError as exc:
        for line in exc.lines:
            print(f"fleetrun-agent: config error: {line}", file=sys.stderr)
        return 2


def check_config(config_path: str, connect: bool = False) -> int:
    """Validate everything the agent would use; with `connect`, reach the control plane.

    Exit 0 when all is well, 2 otherwise, each problem named with its file and key."""
    from agent.client import read_token
    from agent.config import load_agent_config
    from agent.tracking import open_tracking

    try:
        config = load_agent_config(config_path)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"config error: {line}", file=sys.stderr)
        return 2
    problems = []
    for loc in config.code_locations:
        if not loc.git and not os.path.isdir(loc.working_directory):
            problems.append(
                f"code_locations {loc.name}: working_directory "
                f"{loc.working_directory} does not exist"
            )
            continue
        if loc.executable and not os.access(loc.executable, os.X_OK):
            problems.append(
                f"code_locations {loc.name}: executable {loc.executable} is not an executable file"
            )
            continue
        info = asyncio.run(_load_once(loc))
        if info.error:
            problems.append(f"code_locations {loc.name}: {info.error}")
        else:
            print(_describe(info))
    token: str | None = None
    token_state: TokenState = "absent"
    if config.token_file:
        try:
            token = read_token(config.token_file)
            token_state = "read"
        except OSError as exc:
            token_state = "unreadable"
            problems.append(f"token_file: cannot read {config.token_file}: {exc.strerror}")
    try:
        tracking = open_tracking(config.process_tracking)
    except ValueError as exc:
        problems.append(f"process_tracking: {exc}")
    else:
        print(f"process tracking: {tracking.describe()}")
        asyncio.run(tracking.close())
    if connect:
        problems += _check_connection(config, token, token_state)
        if config.run_launcher == "docker":
            problems += asyncio.run(_check_docker(config))
    for problem in problems:
        print(f"{config_path}: {problem}", file=sys.stderr)
    return 2 if problems else 0


async def _load_once(loc: CodeLocationConfig) -> CodeLocationInfo:
    """The location's newest version (fetched, for git) described as the agent would,
    in a folder of its own that goes afterwards."""
    import tempfile

    from agent.codeversions import CodeFetchError, make_version, version_of
    from agent.launchers import describe_location
    from protocol.messages import CodeLocationInfo

    with tempfile.TemporaryDirectory(prefix="fleetrun-check-") as scratch:
        try:
            version = await make_version(loc, scratch)
        except CodeFetchError as exc:
            return CodeLocationInfo(name=loc.name, error=str(exc))
        loaded = version_of(loc, scratch, version)
        assert loaded is not None
        info = await describe_location(loaded)
        return info if info.error else replace(info, version=version)


def _describe(info: CodeLocationInfo) -> str:
    """One line per code location: what the agent would offer the control plane."""
    found = [
        f"{what} {', '.join(names) if names else '(none)'}"
        for what, names in (
            ("jobs", [j.name for j in info.jobs]),
            ("schedules", [s.name for s in info.schedules]),
            ("sensors", [s.name for s in info.sensors]),
        )
    ]
    version = f" (version {info.version})" if info.version else ""
    return f"code location {info.name}{version}: {'; '.join(found)}"


def _check_connection(config: AgentConfig, token: str | None, token_state: TokenState) -> list[str]:
    """Print what the connection check passed; return what it found wrong."""
    from agent.connection_check import ask, judge

    url = config.control_plane_url
    verdict = judge(url, asyncio.run(ask(url, token, config.ca_file)), token_state)
    if verdict.checked:
        print(f"control plane {url}: {', '.join(verdict.checked)}")
    return [f"control_plane_url: {problem}" for problem in verdict.problems]


async def _check_docker(config: AgentConfig) -> list[str]:
    """Print what the Docker check passed (the socket answers, the default image is
    here); return what it found wrong."""
    from agent.containers import DockerLauncher

    launcher = DockerLauncher([], docker=config.docker, agent_name=config.name)
    try:
        version, problem = await launcher.check()
        if problem is not None:
            return [f"docker.socket: {problem}"]
        image = config.docker.image
        try:
            present = await launcher.image_present(image)
        except Exception as exc:
            return [f"docker.image: cannot inspect {image}: {exc}"]
        where = f"Docker {version} at {config.docker.socket}"
        if present:
            print(f"docker: {where}; default image {image} is here")
            return []
        if config.docker.pull == "never":
            return [f"docker.image: {image} is not on this host, and pull = never"]
        print(f"docker: {where}; default image {image} is not here: runs will pull it")
        return []
    finally:
        await launcher.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        from agent.worker.main import main as worker_main

        return worker_main(argv[1:])
    if argv[:1] == ["_forkserver"]:
        from agent.forkserver import main as forkserver_main

        return forkserver_main(argv[1:])
    parser = argparse.ArgumentParser(prog="fleetrun-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", required=True)
    run.add_argument("--log-format", choices=FORMATS, help="text (default) or json lines")
    run.add_argument(
        "--handoff",
        action="store_true",
        help="on SIGTERM, leave running runs to the next start of this agent (upgrades)",
    )
    check = sub.add_parser("check-config", help="validate agent.toml and its code locations")
    check.add_argument("--config", required=True)
    check.add_argument(
        "--connect", action="store_true", help="also check that the control plane answers"
    )
    sub.add_parser("version", help="print the fleetrun and protocol versions")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_agent(args.config, args.log_format, args.handoff)
    if args.command == "check-config":
        return check_config(args.config, args.connect)
    print(f"fleetrun-agent {FLEETRUN_VERSION} (protocol {PROTOCOL_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
