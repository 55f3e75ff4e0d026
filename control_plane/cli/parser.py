"""The `fleetrun` command line: every command and option, and shell completion."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import shtab

from control_plane.cli.admin import (
    cmd_tokens_create,
    cmd_tokens_list,
    cmd_tokens_revoke,
)
from control_plane.cli.client import DEFAULT_URL
from control_plane.cli.commands import (
    cmd_agents_drain,
    cmd_agents_list,
    cmd_agents_reload,
    cmd_health,
    cmd_instigators_list,
    cmd_instigators_set,
    cmd_instigators_show,
    cmd_instigators_ticks,
    cmd_jobs_list,
    cmd_pools_delete,
    cmd_pools_list,
    cmd_pools_set,
    cmd_queue,
    cmd_runs_cancel,
    cmd_runs_events,
    cmd_runs_list,
    cmd_runs_logs,
    cmd_runs_priority,
    cmd_runs_reexecute,
    cmd_runs_show,
    cmd_runs_submit,
    cmd_runs_watch,
)
from control_plane.cli.deletion import cmd_runs_delete
from protocol.logs import FORMATS

COMPLETION_HELP = """\
print a shell completion script for fleetrun (generated from its argument parser)

install it once:
  bash   fleetrun completion bash > ~/.local/share/bash-completion/completions/fleetrun
         (or add  eval "$(fleetrun completion bash)"  to ~/.bashrc)
  zsh    fleetrun completion zsh > "${fpath[1]}/_fleetrun"   (then: compinit)
  tcsh   fleetrun completion tcsh > ~/.fleetrun.csh  and add  source ~/.fleetrun.csh
         to ~/.tcshrc
"""


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = kind(raw)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {raw}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def files(action: argparse.Action) -> argparse.Action:
    """Let the shell completion script offer file names for this option."""
    action.complete = shtab.FILE  # type: ignore[attr-defined]
    return action


def client_options(cmd: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--json, --url, --token and --ca-file after the subcommand too. SUPPRESS leaves the
    value given before the subcommand (or its default) alone when they are not repeated."""
    group = cmd.add_argument_group("output and connection (also accepted before the command)")
    group.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    group.add_argument("--url", default=argparse.SUPPRESS, help="the control plane")
    group.add_argument("--token", default=argparse.SUPPRESS, help="a user token")
    files(
        group.add_argument(
            "--ca-file",
            default=argparse.SUPPRESS,
            help="CA bundle to verify an https control plane",
        )
    )
    return cmd


def _run_filter_options(cmd: argparse.ArgumentParser, limit: int) -> None:
    cmd.add_argument("--status", help="e.g. FAILURE or QUEUED,STARTED")
    cmd.add_argument("--job", help="runs of this job")
    cmd.add_argument("--agent", help="runs launched on this agent (name or id)")
    cmd.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="runs with this tag (repeat: all of them)",
    )
    cmd.add_argument(
        "--limit",
        type=positive(int),
        default=limit,
        help=f"at most this many runs, newest first (default {limit})",
    )


def _add_runs(sub: Any) -> None:
    runs = sub.add_parser("runs", help="submit, watch and inspect runs").add_subparsers(
        dest="action", required=True
    )
    submit = client_options(runs.add_parser("submit", help="submit a run of JOB"))
    submit.add_argument("job")
    submit.add_argument("--location")
    submit.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--config", help="run config as a JSON object")
    submit.add_argument(
        "--wait",
        action="store_true",
        help="show step progress on stderr until the run ends; exit 0 on "
        "SUCCESS, 1 on FAILURE or CANCELED",
    )
    submit.add_argument("-q", "--quiet", action="store_true", help="with --wait: no progress lines")
    submit.set_defaults(func=cmd_runs_submit)

    lst = client_options(runs.add_parser("list", help="list runs, newest first"))
    _run_filter_options(lst, 50)
    lst.add_argument("--cursor", help="the next page, as printed by the previous one")
    lst.set_defaults(func=cmd_runs_list)

    watch = client_options(
        runs.add_parser("watch", help="a live table of runs (JSON lines with --json); Ctrl-C quits")
    )
    _run_filter_options(watch, 25)
    watch.add_argument("--interval", type=positive(float), default=2.0, metavar="SECONDS")
    watch.add_argument("--count", type=positive(int), metavar="N", help="stop after N refreshes")
    watch.set_defaults(func=cmd_runs_watch)

    show = client_options(runs.add_parser("show", help="a run, its steps and its event log"))
    show.add_argument("run_id")
    show.set_defaults(func=cmd_runs_show)

    events = client_options(runs.add_parser("events", help="a run's event log"))
    events.add_argument("run_id")
    events.add_argument(
        "--after", type=int, default=0, metavar="SEQ", help="only events after this sequence number"
    )
    events.add_argument("--type", help="only these event types, e.g. STEP_FAILURE,LOG")
    events.add_argument(
        "--follow", action="store_true", help="keep printing new events until the run ends"
    )
    events.set_defaults(func=cmd_runs_events)

    logs = client_options(
        runs.add_parser("logs", help="a run's compute logs (stdout/stderr of its steps)")
    )
    logs.add_argument("run_id")
    logs.add_argument("--step")
    logs.add_argument("--follow", action="store_true", help="stream until the run ends")
    logs.set_defaults(func=cmd_runs_logs)

    cancel = client_options(
        runs.add_parser("cancel", help="cancel a run (queued: at once; running: stops it)")
    )
    cancel.add_argument("run_id")
    cancel.set_defaults(func=cmd_runs_cancel)
    delete = client_options(
        runs.add_parser(
            "delete",
            help="delete finished runs with their events, logs and outputs (admin): by id, "
            "or by filter (shown first; deleted with --yes)",
        )
    )
    delete.add_argument("run_ids", nargs="*", metavar="ID")
    delete.add_argument("--status", help="finished statuses, e.g. FAILURE (default: all three)")
    delete.add_argument("--before", metavar="DATE", help="runs that ended before, e.g. 2026-01-01")
    delete.add_argument("--job", help="runs of this job")
    delete.add_argument("--yes", action="store_true", help="delete what the filter selects")
    delete.set_defaults(func=cmd_runs_delete)
    reexecute = client_options(
        runs.add_parser("reexecute", help="run a failed or canceled run's job again")
    )
    reexecute.add_argument("run_id")
    reexecute.add_argument(
        "--strategy", choices=["FROM_FAILURE", "ALL_STEPS"], default="FROM_FAILURE"
    )
    reexecute.set_defaults(func=cmd_runs_reexecute)
    priority = client_options(runs.add_parser("priority", help="change a queued run's priority"))
    priority.add_argument("run_id")
    priority.add_argument("priority", type=int)
    priority.set_defaults(func=cmd_runs_priority)


def _add_instigators(sub: Any) -> None:
    for kind in ("schedule", "sensor"):
        group = sub.add_parser(f"{kind}s", help=f"{kind}s and their ticks").add_subparsers(
            dest="action", required=True
        )
        listing = client_options(group.add_parser("list", help=f"every {kind} and its status"))
        listing.set_defaults(func=cmd_instigators_list, kind=kind)
        commands = [
            ("show", f"a {kind}, its state and recent ticks", cmd_instigators_show),
            ("ticks", f"a {kind}'s ticks, newest first", cmd_instigators_ticks),
            ("start", f"start a {kind}", cmd_instigators_set),
            ("stop", f"stop a {kind}", cmd_instigators_set),
        ]
        for action, help_text, func in commands:
            cmd = client_options(group.add_parser(action, help=help_text))
            cmd.add_argument("name")
            cmd.add_argument("--location", help="the code location, if the name is ambiguous")
            if action == "ticks":
                cmd.add_argument("--limit", type=positive(int), default=20)
            cmd.set_defaults(func=func, kind=kind, action_path=action)


def _add_tokens(sub: Any) -> None:
    tokens = sub.add_parser(
        "tokens",
        help="API and agent tokens: with --config straight in the database, "
        "else through the API with an admin token",
    ).add_subparsers(dest="action", required=True)
    create = tokens.add_parser("create", help="create a token and print it once")
    create.add_argument("--kind", choices=["agent", "user"], required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--role", choices=["viewer", "operator", "admin"])
    create.set_defaults(func=cmd_tokens_create)
    listing = tokens.add_parser("list", help="names, kinds, roles, last use (never secrets)")
    listing.set_defaults(func=cmd_tokens_list)
    revoke = tokens.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_tokens_revoke)
    for cmd in (create, listing, revoke):
        files(cmd.add_argument("--config", help="control-plane.toml: act on its database directly"))
        client_options(cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetrun", description=__doc__)
    parser.add_argument(
        "--url",
        default=os.environ.get("FLEETRUN_URL", DEFAULT_URL),
        help=f"the control plane (env FLEETRUN_URL; default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("FLEETRUN_TOKEN"),
        help="a user token (env FLEETRUN_TOKEN)",
    )
    files(
        parser.add_argument(
            "--ca-file",
            default=os.environ.get("FLEETRUN_CA_FILE"),
            help="CA bundle to verify an https control plane (env FLEETRUN_CA_FILE)",
        )
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the control plane")
    files(serve.add_argument("--config", help="control-plane.toml (default: all defaults)"))
    agent = sub.add_parser("agent", help="run an agent")
    files(agent.add_argument("--config", required=True, help="agent.toml"))
    agent.add_argument(
        "--handoff",
        action="store_true",
        help="on SIGTERM, leave running runs to the next start of this agent (upgrades)",
    )
    for cmd in (serve, agent):
        cmd.add_argument("--log-format", choices=FORMATS, help="text (default) or JSON lines")
    migrate = sub.add_parser(
        "migrate", help="apply schema migrations; with --from, copy an instance into a new database"
    )
    files(migrate.add_argument("--config", help="control-plane.toml: its [storage] url"))
    migrate.add_argument(
        "--from",
        dest="source",
        metavar="URL",
        help="copy everything from this storage URL (e.g. sqlite:///old.db)",
    )
    migrate.add_argument("--to", metavar="URL", help="the destination (default: --config's)")
    demo = sub.add_parser("demo", help="control plane + local agent + example jobs")
    demo.add_argument("--port", type=int, default=8470, help="0: any free port")
    demo.add_argument("--exit-when-done", action="store_true", help=argparse.SUPPRESS)

    _add_runs(sub)
    queue = client_options(
        sub.add_parser("queue", help="queued runs in dequeue order and why each waits")
    )
    queue.set_defaults(func=cmd_queue)
    _add_instigators(sub)
    agents = sub.add_parser("agents", help="agents").add_subparsers(dest="action", required=True)
    client_options(
        agents.add_parser("list", help="agents, their load and code locations")
    ).set_defaults(func=cmd_agents_list)
    for action, help_text in (
        ("drain", "stop sending an agent new runs (its runs go on)"),
        ("undrain", "send an agent new runs again"),
    ):
        cmd = client_options(agents.add_parser(action, help=help_text))
        cmd.add_argument("agent", help="agent name or id")
        cmd.set_defaults(func=cmd_agents_drain, action_path=action)
    reload = client_options(
        agents.add_parser(
            "reload",
            help="reload an agent's code locations now (new runs use the new version)",
        )
    )
    reload.add_argument("agent", help="agent name or id")
    reload.add_argument("--location", metavar="L", help="only this code location")
    reload.set_defaults(func=cmd_agents_reload)
    jobs = sub.add_parser("jobs", help="jobs").add_subparsers(dest="action", required=True)
    client_options(jobs.add_parser("list", help="jobs of every code location")).set_defaults(
        func=cmd_jobs_list
    )
    pools = sub.add_parser("pools", help="concurrency pools").add_subparsers(
        dest="action", required=True
    )
    client_options(
        pools.add_parser("list", help="pools: limit, slots in use, holders, waiters in order")
    ).set_defaults(func=cmd_pools_list)
    pool_set = client_options(pools.add_parser("set", help="set a pool's limit (0: paused)"))
    pool_set.add_argument("name", help="pool name")
    pool_set.add_argument("limit", type=int, help="slots in use at once at most")
    pool_set.set_defaults(func=cmd_pools_set)
    pool_delete = client_options(
        pools.add_parser("delete", help="forget a limit set with `pools set`")
    )
    pool_delete.add_argument("name", help="pool name")
    pool_delete.set_defaults(func=cmd_pools_delete)
    _add_tokens(sub)
    health = client_options(
        sub.add_parser(
            "health", help="is the control plane ready (storage, daemon loops)? exit 1 if not"
        )
    )
    health.set_defaults(func=cmd_health)
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh, tcsh)",
        description=COMPLETION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    return parser
