"""`fleetrun`: run the control plane, an agent or the demo, and talk to a control plane.

The command line is parser.py; user commands are commands.py, instance administration
admin.py; they talk to a control plane through client.py and show results with render.py.
"""

from __future__ import annotations

import os
import sys

from control_plane.cli.admin import cmd_completion, cmd_migrate, cmd_serve
from control_plane.cli.client import ApiClient, CliError
from control_plane.cli.parser import build_parser


def main(argv: list[str] | None = None) -> int:
    """Run one `fleetrun` command; its exit code (1 on a failure, named in one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "migrate":
        return cmd_migrate(args)
    if args.command == "agent":
        from agent.cli import run_agent

        return run_agent(args.config, args.log_format, args.handoff)
    if args.command == "demo":
        from control_plane.cli.demo import run_demo

        return run_demo(args.port, args.exit_when_done)
    if args.command == "completion":
        return cmd_completion(args, parser)
    try:
        return args.func(args, ApiClient(args.url, args.token, args.ca_file))
    except CliError as exc:
        print(f"fleetrun: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fleetrun runs watch | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
