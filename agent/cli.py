"""`fleetrun-agent`: the agent binary's commands (run, check-config, version)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from protocol import FLEETRUN_VERSION, PROTOCOL_VERSION
from protocol.schema import ConfigError


def _read_token(path: str) -> str | None:
    if not path:
        return None
    with open(path) as fh:
        return fh.read().strip()


async def _run_agent(config_path: str) -> int:
    from agent.client import ControlPlaneClient
    from agent.config import load_agent_config
    from agent.loop import Agent, FatalAgentError

    config = load_agent_config(config_path)
    token = _read_token(config.token_file)
    async with ControlPlaneClient(config.control_plane_url, token) as client:
        agent = Agent(config, client)
        task = asyncio.create_task(agent.run())
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            logging.getLogger("fleetrun.agent").info("agent stopped")
            return 0
        except FatalAgentError as exc:
            print(f"fleetrun-agent: {exc}", file=sys.stderr)
            return 1
    return 0


def run_agent(config_path: str) -> int:
    """Run an agent until SIGTERM/SIGINT; exit code 2 on a bad config file."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return asyncio.run(_run_agent(config_path))
    except ConfigError as exc:
        print(f"fleetrun-agent: config error: {exc}", file=sys.stderr)
        return 2


def check_config(config_path: str) -> int:
    from agent.config import load_agent_config
    from agent.launcher import describe_location

    try:
        config = load_agent_config(config_path)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    problems = 0
    for loc in config.code_locations:
        info = asyncio.run(describe_location(loc))
        if info.error:
            problems += 1
            print(f"code_locations {loc.name}: {info.error}", file=sys.stderr)
        else:
            print(f"code location {loc.name}: jobs {', '.join(j.name for j in info.jobs)}")
    return 2 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        from agent.worker import main as worker_main

        return worker_main(argv[1:])
    if argv[:1] == ["_forkserver"]:
        from agent.forkserver import main as forkserver_main

        return forkserver_main(argv[1:])
    parser = argparse.ArgumentParser(prog="fleetrun-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", required=True)
    check = sub.add_parser("check-config", help="validate agent.toml and its code locations")
    check.add_argument("--config", required=True)
    sub.add_parser("version", help="print the fleetrun and protocol versions")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_agent(args.config)
    if args.command == "check-config":
        return check_config(args.config)
    print(f"fleetrun-agent {FLEETRUN_VERSION} (protocol {PROTOCOL_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
