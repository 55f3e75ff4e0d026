"""`fleetrun`: run the control plane, an agent or the demo, and talk to a control plane."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from control_plane.statuses import EVENT_STATUS, TERMINAL_STATUSES
from protocol.schema import ConfigError

DEFAULT_URL = "http://127.0.0.1:8470"


class CliError(Exception):
    """A failure to report to the user in one line; exit code 1."""


class ApiClient:
    """A small synchronous client of the JSON API, for the CLI."""

    def __init__(self, url: str, token: str | None, ca_file: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.context = None
        if self.url.startswith("https://"):
            import ssl

            self.context = ssl.create_default_context(cafile=ca_file or None)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: list[tuple[str, str]] | None = None,
        wait: float = 30.0,
    ) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}/api/v1{path}{query}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=wait + 30, context=self.context) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())["error"]
                raise CliError(f"{err['message']} ({exc.code} {err['code']})") from None
            except (ValueError, KeyError, TypeError):
                raise CliError(f"HTTP {exc.code} from {self.url}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach the control plane at {self.url}: {reason}") from None


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _parse_kv(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        if not sep or not key:
            raise CliError(f"{what} must be KEY=VALUE, got {raw!r}")
        out[key] = value
    return out


def _follow_status(client: ApiClient, run_id: str, quiet: bool) -> str:
    """Print the run's status changes until it ends; return the final status."""
    after = 0
    while True:
        events = client.request(
            "GET", f"/runs/{run_id}/events", params=[("after", str(after)), ("wait", "20")],
            wait=20,
        )["events"]  # fmt: skip
        for ev in events:
            after = ev["seq"]
            status = EVENT_STATUS.get(ev["type"])
            if status is not None and not quiet:
                print(f"{ev['time']}  {status:<9}  {ev['message']}", file=sys.stderr)
            if status in TERMINAL_STATUSES:
                return str(status)


def cmd_runs_submit(args: argparse.Namespace, client: ApiClient) -> int:
    body: dict[str, Any] = {"job": args.job, "tags": _parse_kv(args.tag, "--tag")}
    if args.location:
        body["location"] = args.location
    if args.config:
        try:
            body["config"] = json.loads(args.config)
        except ValueError as exc:
            raise CliError(f"--config is not valid JSON: {exc}") from None
    created = client.request("POST", "/runs", body)
    if not args.wait:
        _emit(args, created, created["run_id"])
        return 0
    print(created["run_id"], file=sys.stderr)
    final = _follow_status(client, created["run_id"], quiet=args.json)
    run = client.request("GET", f"/runs/{created['run_id']}")
    _emit(args, run, f"{run['run_id']} {final}: {run['status_reason'] or ''}")
    return 0 if final == "SUCCESS" else 1


def cmd_runs_list(args: argparse.Namespace, client: ApiClient) -> int:
    params = [("limit", str(args.limit))]
    if args.status:
        params.append(("status", args.status))
    if args.job:
        params.append(("job", args.job))
    for key, value in _parse_kv(args.tag, "--tag").items():
        params.append(("tag", f"{key}:{value}"))
    if args.cursor:
        params.append(("cursor", args.cursor))
    data = client.request("GET", "/runs", params=params)
    rows = [
        [r["run_id"], r["job"], r["status"], r["agent"] or "", r["create_time"]]
        for r in data["runs"]
    ]
    text = _table(rows, ["RUN ID", "JOB", "STATUS", "AGENT", "CREATED"])
    if data["next_cursor"]:
        text += f"\n(more: --cursor {data['next_cursor']})"
    _emit(args, data, text)
    return 0


def _retry_chain(client: ApiClient, run: dict) -> list[dict]:
    """The run's retry group in order: the root run, then retry 1, 2, ..."""
    root_id = run["root_run_id"] or run["run_id"]
    params = [("tag", f"fleetrun/root_run_id:{root_id}"), ("limit", "1000")]
    retries = client.request("GET", "/runs", params=params)["runs"]
    if not retries:
        return []
    root = run if root_id == run["run_id"] else client.request("GET", f"/runs/{root_id}")
    retries.sort(key=lambda r: int(r["tags"].get("fleetrun/retry_number", "0")))
    return [root, *retries]


def cmd_runs_show(args: argparse.Namespace, client: ApiClient) -> int:
    run = client.request("GET", f"/runs/{args.run_id}")
    events = client.request("GET", f"/runs/{args.run_id}/events")["events"]
    chain = _retry_chain(client, run)
    if args.json:
        print(json.dumps({**run, "events": events, "retry_chain": chain}, indent=2))
        return 0
    for key in ("run_id", "job", "location", "status", "status_reason", "failure_kind",
                "agent", "lease", "create_time", "start_time", "end_time"):  # fmt: skip
        print(f"{key + ':':<15}{run[key] if run[key] is not None else '-'}")
    print(f"{'tags:':<15}{', '.join(f'{k}={v}' for k, v in sorted(run['tags'].items()))}")
    if chain:
        print("retry chain:")
        for number, member in enumerate(chain):
            label = "original run" if number == 0 else f"retry {number}"
            here = "  <- this run" if member["run_id"] == run["run_id"] else ""
            print(f"  {label:<14}{member['run_id']}  {member['status']}{here}")
    print()
    rows = [[e["seq"], e["time"], e["type"], e["step"] or "", e["message"]] for e in events]
    print(_table(rows, ["SEQ", "TIME", "EVENT", "STEP", "MESSAGE"]))
    return 0


def cmd_runs_logs(args: argparse.Namespace, client: ApiClient) -> int:
    after = 0
    while True:
        params = [("after", str(after))]
        if args.step:
            params.append(("step", args.step))
        if args.follow:
            params.append(("wait", "20"))
        chunks = client.request("GET", f"/runs/{args.run_id}/logs", params=params, wait=20)["logs"]
        for chunk in chunks:
            after = chunk["id"]
            out = sys.stderr if chunk["stream"] == "stderr" else sys.stdout
            prefix = f"[{chunk['step'] or 'worker'}] " if not args.step else ""
            for line in chunk["text"].splitlines(keepends=True):
                out.write(prefix + line)
            out.flush()
        if not args.follow:
            return 0
        if not chunks:
            run = client.request("GET", f"/runs/{args.run_id}")
            if run["status"] in TERMINAL_STATUSES:
                return 0


def cmd_runs_cancel(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("POST", f"/runs/{args.run_id}/cancel", {})
    _emit(args, data, f"{data['run_id']} {data['status']}")
    return 0


def cmd_runs_reexecute(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("POST", f"/runs/{args.run_id}/reexecute", {"strategy": args.strategy})
    _emit(args, data, data["run_id"])
    return 0


def cmd_runs_priority(args: argparse.Namespace, client: ApiClient) -> int:
    run = client.request("POST", f"/runs/{args.run_id}/priority", {"priority": args.priority})
    _emit(args, run, f"{run['run_id']} priority {run['tags'].get('fleetrun/priority')}")
    return 0


def cmd_queue(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("GET", "/queue")
    rows = [
        [r["position"], r["run_id"], r["job"], r["queue"], r["priority"],
         r["waiting_for"] or f"launching on {r['next_agent']}"]
        for r in data["runs"]
    ]  # fmt: skip
    text = _table(rows, ["#", "RUN ID", "JOB", "QUEUE", "PRIORITY", "WAITING FOR"])
    limits = [[u["limit"], f"{u['in_use']}/{u['max']}", ", ".join(u["runs"][:5])]
              for u in data["limits"]]  # fmt: skip
    if limits:
        text += "\n\n" + _table(limits, ["LIMIT", "IN USE", "HELD BY"])
    _emit(args, data, text)
    return 0


def cmd_instigators_list(args: argparse.Namespace, client: ApiClient) -> int:
    kind = args.kind
    data = client.request("GET", f"/{kind}s")
    items = data[f"{kind}s"]
    if kind == "schedule":
        rows = [[s["name"], s["location"], s["status"], s.get("cron") or "",
                 s.get("timezone") or "", ", ".join(s.get("next_ticks") or [])[:60]]
                for s in items]  # fmt: skip
        headers = ["NAME", "LOCATION", "STATUS", "CRON", "TIMEZONE", "NEXT TICKS"]
    else:
        rows = []
        for s in items:
            params = [("limit", "1"), ("location", s["location"])]
            last = client.request("GET", f"/sensors/{s['name']}/ticks", params=params)["ticks"]
            tick = f"{last[0]['status']} {last[0]['start_time']}" if last else ""
            interval = s.get("minimum_interval_seconds") or ""
            rows.append([s["name"], s["location"], s["status"], interval, tick,
                         s.get("cursor") or ""])  # fmt: skip
        headers = ["NAME", "LOCATION", "STATUS", "INTERVAL", "LAST TICK", "CURSOR"]
    _emit(args, data, _table(rows, headers))
    return 0


def cmd_instigators_set(args: argparse.Namespace, client: ApiClient) -> int:
    path = f"/{args.kind}s/{args.name}/{args.action_path}"
    params = [("location", args.location)] if args.location else None
    data = client.request("POST", path, {}, params=params)
    _emit(args, data, f"{data['name']} {data['status']}")
    return 0


def cmd_agents_drain(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("POST", f"/agents/{args.agent}/{args.action_path}", {})
    _emit(args, data, f"{data['name']} {data['status']}")
    return 0


def cmd_agents_list(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("GET", "/agents")
    rows = [
        [
            a["name"], a["status"], ",".join(a["queues"]),
            f"{a['running']}/{a['max_concurrent_runs']}", a["last_heartbeat"], a["version"],
            ", ".join(c["name"] + (" (ERROR)" if c["error"] else "") for c in a["code_locations"]),
        ]
        for a in data["agents"]
    ]  # fmt: skip
    headers = ["NAME", "STATUS", "QUEUES", "RUNNING", "LAST HEARTBEAT", "VERSION", "LOCATIONS"]
    _emit(args, data, _table(rows, headers))
    return 0


def cmd_jobs_list(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("GET", "/jobs")
    rows = [
        [j["name"], j["location"], len(j["ops"]), j["executor"], ", ".join(j["agents"])]
        for j in data["jobs"]
    ]
    text = _table(rows, ["JOB", "LOCATION", "OPS", "EXECUTOR", "AGENTS"])
    for err in data["location_errors"]:
        first_line = err["error"].splitlines()[0] if err["error"] else ""
        text += f"\nlocation {err['location']} on {err['agent']} failed to load: {first_line}"
    _emit(args, data, text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from control_plane.app import serve
    from control_plane.config import load_control_plane_config

    try:
        config = load_control_plane_config(args.config)
    except ConfigError as exc:
        print(f"fleetrun: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"fleetrun: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _token_storage(config_path: str) -> Any:
    from control_plane.config import load_control_plane_config
    from control_plane.storage import open_storage

    try:
        return open_storage(load_control_plane_config(config_path).storage.url)
    except ConfigError as exc:
        raise CliError(f"config error: {exc}") from None


def _with_storage(config_path: str, action: Any) -> Any:
    """Run `action(storage)` against the instance's database (no control plane needed)."""
    import asyncio

    async def run() -> Any:
        storage = _token_storage(config_path)
        await storage.open()
        try:
            return await action(storage)
        finally:
            await storage.close()

    return asyncio.run(run())


def _print_tokens(args: argparse.Namespace, tokens: list[dict[str, Any]]) -> int:
    rows = [[t["name"], t["kind"], t["role"] or "", "revoked" if t["revoked"] else "active",
             t["create_time"], t["last_used"] or "never"] for t in tokens]  # fmt: skip
    _emit(args, {"tokens": tokens},
          _table(rows, ["NAME", "KIND", "ROLE", "STATE", "CREATED", "LAST USED"]))  # fmt: skip
    return 0


def cmd_tokens_create(args: argparse.Namespace, client: ApiClient) -> int:
    """Prints the token once; only its salted hash is stored."""
    import time

    from control_plane.storage import NameTaken
    from control_plane.token_api import TokenRequestError, create_token

    role = args.role if args.kind == "user" else None
    if args.kind == "user" and role is None:
        raise CliError("a user token needs --role viewer|operator|admin")
    if args.config:
        try:
            token, record = _with_storage(args.config, lambda storage: create_token(
                storage, args.name, args.kind, role, time.time()))  # fmt: skip
        except (TokenRequestError, NameTaken) as exc:
            raise CliError(str(exc)) from None
        data = {**record.to_json(), "token": token}
    else:
        data = client.request("POST", "/tokens", {"name": args.name, "kind": args.kind,
                                                  "role": role})  # fmt: skip
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(data["token"])
        print(f"(token {data['name']}, {data['kind']}{', ' + role if role else ''}: shown "
              "once; store it now)", file=sys.stderr)  # fmt: skip
    return 0


def cmd_tokens_list(args: argparse.Namespace, client: ApiClient) -> int:
    if args.config:
        records = _with_storage(args.config, lambda storage: storage.list_tokens())
        return _print_tokens(args, [r.to_json() for r in records])
    return _print_tokens(args, client.request("GET", "/tokens")["tokens"])


def cmd_tokens_revoke(args: argparse.Namespace, client: ApiClient) -> int:
    """A running control plane refuses the token within a second."""
    import time

    if args.config:
        record = _with_storage(args.config, lambda s: s.revoke_token(args.name, time.time()))
        if record is None:
            raise CliError(f"no live token named {args.name!r}")
        data = record.to_json()
    else:
        data = client.request("POST", f"/tokens/{urllib.parse.quote(args.name, safe='')}/revoke")
    _emit(args, data, f"revoked token {data['name']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetrun", description=__doc__)
    parser.add_argument("--url", default=os.environ.get("FLEETRUN_URL", DEFAULT_URL))
    parser.add_argument("--token", default=os.environ.get("FLEETRUN_TOKEN"))
    parser.add_argument("--ca-file", default=os.environ.get("FLEETRUN_CA_FILE"),
                        help="CA bundle to verify an https control plane")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the control plane")
    serve.add_argument("--config", help="control-plane.toml (default: all defaults)")
    agent = sub.add_parser("agent", help="run an agent")
    agent.add_argument("--config", required=True, help="agent.toml")
    demo = sub.add_parser("demo", help="control plane + local agent + example jobs")
    demo.add_argument("--port", type=int, default=8470, help="0: any free port")
    demo.add_argument("--exit-when-done", action="store_true", help=argparse.SUPPRESS)

    runs = sub.add_parser("runs", help="submit and inspect runs").add_subparsers(
        dest="action", required=True
    )
    submit = runs.add_parser("submit", help="submit a run of JOB")
    submit.add_argument("job")
    submit.add_argument("--location")
    submit.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--config", help="run config as a JSON object")
    submit.add_argument("--wait", action="store_true", help="wait; exit 1 unless SUCCESS")
    submit.set_defaults(func=cmd_runs_submit)
    lst = runs.add_parser("list", help="list runs, newest first")
    lst.add_argument("--status", help="e.g. FAILURE or QUEUED,STARTED")
    lst.add_argument("--job")
    lst.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--cursor")
    lst.set_defaults(func=cmd_runs_list)
    show = runs.add_parser("show", help="a run and its event log")
    show.add_argument("run_id")
    show.set_defaults(func=cmd_runs_show)
    logs = runs.add_parser("logs", help="a run's compute logs (stdout/stderr of its steps)")
    logs.add_argument("run_id")
    logs.add_argument("--step")
    logs.add_argument("--follow", action="store_true")
    logs.set_defaults(func=cmd_runs_logs)

    cancel = runs.add_parser("cancel", help="cancel a run (queued: at once; running: stops it)")
    cancel.add_argument("run_id")
    cancel.set_defaults(func=cmd_runs_cancel)
    reexecute = runs.add_parser("reexecute", help="run a failed or canceled run's job again")
    reexecute.add_argument("run_id")
    reexecute.add_argument("--strategy", choices=["FROM_FAILURE", "ALL_STEPS"],
                           default="FROM_FAILURE")  # fmt: skip
    reexecute.set_defaults(func=cmd_runs_reexecute)
    priority = runs.add_parser("priority", help="change a queued run's priority")
    priority.add_argument("run_id")
    priority.add_argument("priority", type=int)
    priority.set_defaults(func=cmd_runs_priority)
    sub.add_parser("queue", help="queued runs in dequeue order and why each waits").set_defaults(
        func=cmd_queue
    )

    for kind in ("schedule", "sensor"):
        parser_for_kind = sub.add_parser(f"{kind}s", help=f"{kind}s")
        group = parser_for_kind.add_subparsers(dest="action", required=True)
        group.add_parser("list").set_defaults(func=cmd_instigators_list, kind=kind)
        for action in ("start", "stop"):
            cmd = group.add_parser(action, help=f"{action} a {kind}")
            cmd.add_argument("name")
            cmd.add_argument("--location", help="the code location, if the name is ambiguous")
            cmd.set_defaults(func=cmd_instigators_set, kind=kind, action_path=action)
    agents = sub.add_parser("agents", help="agents").add_subparsers(dest="action", required=True)
    agents.add_parser("list").set_defaults(func=cmd_agents_list)
    for action, help_text in (("drain", "stop sending an agent new runs (its runs go on)"),
                              ("undrain", "send an agent new runs again")):  # fmt: skip
        cmd = agents.add_parser(action, help=help_text)
        cmd.add_argument("agent", help="agent name or id")
        cmd.set_defaults(func=cmd_agents_drain, action_path=action)
    jobs = sub.add_parser("jobs", help="jobs").add_subparsers(dest="action", required=True)
    jobs.add_parser("list").set_defaults(func=cmd_jobs_list)

    tokens = sub.add_parser(
        "tokens", help="API and agent tokens: with --config straight in the database, "
        "else through the API with an admin token",
    ).add_subparsers(dest="action", required=True)  # fmt: skip
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
        cmd.add_argument("--config", help="control-plane.toml: act on its database directly")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "agent":
        from agent.cli import run_agent

        return run_agent(args.config)
    if args.command == "demo":
        from control_plane.demo import run_demo

        return run_demo(args.port, args.exit_when_done)
    try:
        return args.func(args, ApiClient(args.url, args.token, args.ca_file))
    except CliError as exc:
        print(f"fleetrun: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
