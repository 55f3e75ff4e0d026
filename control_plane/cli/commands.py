"""The user commands: runs, queue, schedules and sensors, agents, jobs, health."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from control_plane.cli.client import ApiClient, CliError
from control_plane.cli.render import (
    LogPrinter,
    StepTracker,
    chain_rows,
    draw_watch,
    duration,
    elapsed,
    emit,
    emit_line,
    one_line,
    progress_line,
    runs_table,
    say,
    seg,
    short_version,
    table,
    ticks_table,
    watch_body,
)
from control_plane.model.statuses import EVENT_STATUS, TERMINAL_STATUSES

LONG_POLL_SECONDS = 20  # held by the server; under its 30 s maximum


EVENT_PAGE = 1000  # the events route's default page size


def parse_kv(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        if not sep or not key:
            raise CliError(f"{what} must be KEY=VALUE, got {raw!r}")
        out[key] = value
    return out


def _events(
    client: ApiClient, run_id: str, after: int = 0, follow: bool = False
) -> Iterator[dict[str, Any]]:
    """The run's events in order, every page; with `follow`, also new ones until it ends."""
    ended = False
    while True:
        wait = follow and not ended
        params = [("after", str(after)), ("limit", str(EVENT_PAGE))]
        if wait:
            params.append(("wait", str(LONG_POLL_SECONDS)))
        page = client.request(
            "GET", f"/runs/{seg(run_id)}/events", params=params, wait=LONG_POLL_SECONDS
        )["events"]
        for ev in page:
            after = ev["seq"]
            ended = ended or EVENT_STATUS.get(ev["type"]) in TERMINAL_STATUSES
            yield ev
        if page and len(page) >= EVENT_PAGE:
            continue  # more already stored
        if not wait:
            return
        if not page:  # a quiet long-poll: make sure the run has not ended without an event
            run = client.request("GET", f"/runs/{seg(run_id)}")
            ended = run["status"] in TERMINAL_STATUSES


def _job_size(client: ApiClient, job: str, location: str | None) -> int | None:
    """How many steps the job has, for `[done/total]`; None if it cannot be told."""
    try:
        jobs = client.request("GET", "/jobs")["jobs"]
    except CliError:
        return None
    sizes = {
        len(j["ops"])
        for j in jobs
        if j["name"] == job and (location is None or j["location"] == location)
    }
    return sizes.pop() if len(sizes) == 1 else None


def cmd_runs_submit(args: argparse.Namespace, client: ApiClient) -> int:
    """With --wait: step progress on stderr, the outcome on stdout and in the exit code."""
    body: dict[str, Any] = {"job": args.job, "tags": parse_kv(args.tag, "--tag")}
    if args.location:
        body["location"] = args.location
    if args.config:
        try:
            body["config"] = json.loads(args.config)
        except ValueError as exc:
            raise CliError(f"--config is not valid JSON: {exc}") from None
    created = client.request("POST", "/runs", body)
    run_id = created["run_id"]
    if not args.wait:
        emit(args, created, run_id)
        return 0
    progress = None if args.quiet else sys.stderr
    say(progress, f"submitted run {run_id} of job {args.job}")
    total = _job_size(client, args.job, args.location) if progress else None
    tracker = StepTracker()
    try:
        for ev in _events(client, run_id, follow=True):
            line = progress_line(ev, tracker, total)
            if line is not None:
                say(progress, line)
    except KeyboardInterrupt:
        print(
            f"fleetrun: stopped waiting; run {run_id} goes on (stop it with "
            f"`fleetrun runs cancel {run_id}`)",
            file=sys.stderr,
        )
        return 130
    run = client.request("GET", f"/runs/{seg(run_id)}")
    reason = f": {run['status_reason']}" if run.get("status_reason") else ""
    emit(args, run, f"{run_id} {run['status']}{reason}")
    return 0 if run["status"] == "SUCCESS" else 1


def _run_filter(args: argparse.Namespace) -> list[tuple[str, str]]:
    params = [("limit", str(args.limit))]
    if args.status:
        params.append(("status", args.status))
    if args.job:
        params.append(("job", args.job))
    if args.agent:
        params.append(("agent", args.agent))
    for key, value in parse_kv(args.tag, "--tag").items():
        params.append(("tag", f"{key}={value}"))
    return params


def _agent_names(client: ApiClient) -> dict[str, str]:
    """Agent id -> name: a run names its agent by id, people know agents by name."""
    try:
        return {a["agent_id"]: a["name"] for a in client.request("GET", "/agents")["agents"]}
    except CliError:
        return {}


def cmd_runs_list(args: argparse.Namespace, client: ApiClient) -> int:
    params = _run_filter(args)
    if args.cursor:
        params.append(("cursor", args.cursor))
    data = client.request("GET", "/runs", params=params)
    names = _agent_names(client) if data["runs"] and not args.json else {}
    text = runs_table(data["runs"], names)
    if data["next_cursor"]:
        text += f"\n(more: --cursor {data['next_cursor']})"
    emit(args, data, text)
    return 0


def cmd_runs_watch(args: argparse.Namespace, client: ApiClient) -> int:
    """Redraws the run list every --interval s; a failed refresh after the first is shown,
    not fatal, so a restarting control plane does not end the watch. Ctrl-C exits 0."""
    params = _run_filter(args)
    redraw = sys.stdout.isatty() and not args.json
    refreshes = 0
    names: dict[str, str] = {}
    try:
        while True:
            now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            try:
                data: dict[str, Any] | None = client.request("GET", "/runs", params=params)
                runs = data["runs"] if data is not None else []
                names = _agent_names(client) if runs and not args.json else {}
                problem = ""
            except CliError as exc:
                if refreshes == 0:
                    raise
                data, problem = None, str(exc)
            refreshes += 1
            if args.json:
                emit_line({"time": now, **(data or {"error": problem})})
            else:
                body = f"refresh failed: {problem}" if data is None else watch_body(data, names)
                draw_watch(f"{client.url}  {now}  every {args.interval:g} s", body, redraw)
            if args.count is not None and refreshes >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def cmd_runs_show(args: argparse.Namespace, client: ApiClient) -> int:
    run = client.request("GET", f"/runs/{seg(args.run_id)}")
    events = list(_events(client, args.run_id))
    tracker = StepTracker()
    for ev in events:
        tracker.update(ev)
    if args.json:
        steps = [
            {
                "step": s.name,
                "status": s.status,
                "attempts": s.attempts,
                "start_time": s.first_start,
                "end_time": s.end,
            }
            for s in tracker.steps.values()
        ]
        print(json.dumps({**run, "events": events, "steps": steps}, indent=2))
        return 0
    if run.get("agent"):
        name = _agent_names(client).get(run["agent"])
        run_view = {**run, "agent": f"{name} ({run['agent']})" if name else run["agent"]}
    else:
        run_view = run
    for key in (
        "run_id",
        "job",
        "location",
        "status",
        "status_reason",
        "failure_kind",
        "agent",
        "lease",
        "create_time",
        "start_time",
        "end_time",
        "code_version",
    ):
        value = run_view.get(key)
        print(f"{key + ':':<15}{value if value is not None else '-'}")
    print(f"{'duration:':<15}{duration(elapsed(run['start_time'], run['end_time'])) or '-'}")
    print(f"{'tags:':<15}{', '.join(f'{k}={v}' for k, v in sorted(run['tags'].items()))}")
    chain = chain_rows(run)
    if chain:
        print("retry chain:")
        print("\n".join(chain))
    if tracker.steps:
        print()
        print(table(tracker.rows(), ["STEP", "STATUS", "ATTEMPTS", "TIME"]))
    print()
    rows = [[e["seq"], e["time"], e["type"], e["step"] or "", e["message"]] for e in events]
    print(table(rows, ["SEQ", "TIME", "EVENT", "STEP", "MESSAGE"]))
    return 0


def cmd_runs_events(args: argparse.Namespace, client: ApiClient) -> int:
    """The event log from --after on; --follow streams it (JSON lines with --json)."""
    types = {t.strip().upper() for t in args.type.split(",")} if args.type else None
    stream = _events(client, args.run_id, args.after, follow=args.follow)
    if not args.follow:
        events = [e for e in stream if types is None or e["type"] in types]
        rows = [[e["seq"], e["time"], e["type"], e["step"] or "", e["message"]] for e in events]
        emit(args, {"events": events}, table(rows, ["SEQ", "TIME", "EVENT", "STEP", "MESSAGE"]))
        return 0
    for ev in stream:
        if types is not None and ev["type"] not in types:
            continue
        if args.json:
            emit_line(ev)
        else:
            print(
                f"{ev['seq']:>5}  {ev['time']}  {ev['type']:<18}  {ev['step'] or '':<16}  "
                f"{one_line(ev['message'])}".rstrip(),
                flush=True,
            )
    return 0


def cmd_runs_logs(args: argparse.Namespace, client: ApiClient) -> int:
    """Each step's stdout/stderr chunks; --follow ends once the run has ended."""
    after = 0
    collected: list[dict[str, Any]] = []
    printer = LogPrinter(prefix=not args.step)
    while True:
        params = [("after", str(after))]
        if args.step:
            params.append(("step", args.step))
        if args.follow:
            params.append(("wait", str(LONG_POLL_SECONDS)))
        chunks = client.request(
            "GET", f"/runs/{seg(args.run_id)}/logs", params=params, wait=LONG_POLL_SECONDS
        )["logs"]
        for chunk in chunks:
            after = chunk["id"]
            if not args.json:
                printer.write(chunk)
            elif args.follow:
                emit_line(chunk)
            else:
                collected.append(chunk)
        if not args.follow:
            break
        if not chunks:
            run = client.request("GET", f"/runs/{seg(args.run_id)}")
            if run["status"] in TERMINAL_STATUSES:
                break
    printer.close()
    if args.json and not args.follow:
        print(json.dumps({"logs": collected}, indent=2))
    return 0


def cmd_runs_cancel(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("POST", f"/runs/{seg(args.run_id)}/cancel", {})
    emit(args, data, f"{data['run_id']} {data['status']}")
    return 0


def cmd_runs_reexecute(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request(
        "POST", f"/runs/{seg(args.run_id)}/reexecute", {"strategy": args.strategy}
    )
    emit(args, data, data["run_id"])
    return 0


def cmd_runs_priority(args: argparse.Namespace, client: ApiClient) -> int:
    run = client.request("POST", f"/runs/{seg(args.run_id)}/priority", {"priority": args.priority})
    emit(args, run, f"{run['run_id']} priority {run['tags'].get('fleetrun/priority')}")
    return 0


def cmd_queue(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("GET", "/queue")
    rows = [
        [
            r["position"],
            r["run_id"],
            r["job"],
            r["queue"],
            r["priority"],
            r["waiting_for"] or f"launching on {r['next_agent']}",
        ]
        for r in data["runs"]
    ]
    text = table(rows, ["#", "RUN ID", "JOB", "QUEUE", "PRIORITY", "WAITING FOR"])
    limits = [
        [u["limit"], f"{u['in_use']}/{u['max']}", ", ".join(u["runs"][:5])] for u in data["limits"]
    ]
    if limits:
        text += "\n\n" + table(limits, ["LIMIT", "IN USE", "HELD BY"])
    pools = [
        [p["name"], f"{p['in_use']}/{_pool_limit(p['limit'])}", p["waiting"], _claims(p["waiters"])]
        for p in data.get("pools", [])
    ]
    if pools:
        text += "\n\nsteps of running runs waiting for pool slots:\n"
        text += table(pools, ["POOL", "IN USE", "WAITING", "NEXT IN LINE"])
    steps = [
        [
            s["run_id"][:8],
            s["step"],
            s["attempt"],
            s["queue"],
            s["waiting_for"] or f"launching on {s['next_agent']}",
        ]
        for s in data.get("step_tasks", [])
    ]
    if steps:
        text += "\n\nstep tasks of fleet runs waiting for an agent:\n"
        text += table(steps, ["RUN", "STEP", "ATTEMPT", "QUEUE", "WAITING FOR"])
    emit(args, data, text)
    return 0


def _pool_limit(limit: int | None) -> str:
    return "unlimited" if limit is None else str(limit)


def _claims(claims: list[dict[str, Any]], shown: int = 3) -> str:
    """Claims as `run/step` (a run's own slot: `run`), the first `shown` of them."""
    names = [c["run_id"][:8] + (f"/{c['step']}" if c["step"] else "") for c in claims]
    return ", ".join(names[:shown]) + (f" (+{len(names) - shown})" if len(names) > shown else "")


def cmd_pools_list(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("GET", "/pools")
    rows = [
        [
            p["name"],
            _pool_limit(p["limit"]),
            p["source"],
            p["in_use"],
            p["waiting"],
            _claims(p["holders"]),
            _claims(p["waiters"]),
        ]
        for p in data["pools"]
    ]
    headers = ["POOL", "LIMIT", "SOURCE", "IN USE", "WAITING", "HOLDERS", "WAITERS (IN ORDER)"]
    text = f"granularity {data['granularity']}; default_pool_limit {data['default_pool_limit']}"
    emit(args, data, text + "\n\n" + table(rows, headers))
    return 0


def cmd_pools_set(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("PUT", f"/pools/{seg(args.name)}", {"limit": args.limit})
    emit(args, data, f"pool {data['name']}: limit {data['limit']}")
    return 0


def cmd_pools_delete(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("DELETE", f"/pools/{seg(args.name)}")
    emit(args, data, f"pool {data['name']}: limit {_pool_limit(data['limit'])} ({data['source']})")
    return 0


def _location(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    return [("location", args.location)] if args.location else None


def cmd_instigators_list(args: argparse.Namespace, client: ApiClient) -> int:
    kind = args.kind
    data = client.request("GET", f"/{kind}s")
    items = data[f"{kind}s"]
    if kind == "schedule":
        rows = [
            [
                s["name"],
                s["location"],
                s["status"],
                s.get("cron") or "",
                s.get("timezone") or "",
                ", ".join(s.get("next_ticks") or [])[:60],
            ]
            for s in items
        ]
        headers = ["NAME", "LOCATION", "STATUS", "CRON", "TIMEZONE", "NEXT TICKS"]
    else:
        rows = []
        for s in items:
            params = [("limit", "1"), ("location", s["location"])]
            last = client.request("GET", f"/sensors/{seg(s['name'])}/ticks", params=params)["ticks"]
            tick = f"{last[0]['status']} {last[0]['start_time']}" if last else ""
            interval = s.get("minimum_interval_seconds") or ""
            rows.append(
                [s["name"], s["location"], s["status"], interval, tick, s.get("cursor") or ""]
            )
        headers = ["NAME", "LOCATION", "STATUS", "INTERVAL", "LAST TICK", "CURSOR"]
    emit(args, data, table(rows, headers))
    return 0


def cmd_instigators_show(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("GET", f"/{args.kind}s/{seg(args.name)}", params=_location(args))
    fields = ["name", "location", "status", "job"]
    if args.kind == "schedule":
        fields += ["cron", "timezone", "catchup"]
    else:
        fields += ["minimum_interval_seconds", "cursor", "last_run_key"]
    lines = [
        f"{key + ':':<26}{'-' if data.get(key) in (None, '') else data[key]}" for key in fields
    ]
    if args.kind == "schedule":
        lines.append(f"{'next ticks:':<26}{', '.join(data.get('next_ticks') or []) or '-'}")
    lines.append(f"{'last tick time:':<26}{data.get('last_tick_time') or '-'}")
    recent = data.get("recent_ticks") or []
    lines += ["", "recent ticks:", ticks_table(recent, args.kind) if recent else "  none yet"]
    emit(args, data, "\n".join(lines))
    return 0


def cmd_instigators_ticks(args: argparse.Namespace, client: ApiClient) -> int:
    params = [("limit", str(args.limit)), *(_location(args) or [])]
    data = client.request("GET", f"/{args.kind}s/{seg(args.name)}/ticks", params=params)
    emit(args, data, ticks_table(data["ticks"], args.kind))
    return 0


def cmd_instigators_set(args: argparse.Namespace, client: ApiClient) -> int:
    path = f"/{args.kind}s/{seg(args.name)}/{args.action_path}"
    data = client.request("POST", path, {}, params=_location(args))
    emit(args, data, f"{data['name']} {data['status']}")
    return 0


def cmd_agents_drain(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("POST", f"/agents/{seg(args.agent)}/{args.action_path}", {})
    emit(args, data, f"{data['name']} {data['status']}")
    return 0


def cmd_agents_reload(args: argparse.Namespace, client: ApiClient) -> int:
    body = {"location": args.location} if args.location else {}
    data = client.request("POST", f"/agents/{seg(args.agent)}/reload", body)
    what = f"code location {data['location']}" if data["location"] else "its code locations"
    emit(args, data, f"{data['name']} reloads {what}")
    return 0


def _location_cell(loc: dict[str, Any]) -> str:
    """A location in the agents table: its name, the version serving, and trouble."""
    text = loc["name"]
    if loc.get("version"):
        text += f"@{short_version(loc['version'])}"
    if loc["error"]:
        text += " (ERROR)"
    elif loc.get("reload_error"):
        text += " (RELOAD FAILED)"
    return text


def cmd_agents_list(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("GET", "/agents")
    rows = [
        [
            a["name"],
            a["status"],
            ",".join(a["queues"]),
            f"{a['running']}/{a['max_concurrent_runs']}",
            a.get("launcher") or "-",
            a["last_heartbeat"],
            a["version"],
            ", ".join(_location_cell(c) for c in a["code_locations"]),
            ",".join(f"{k}={v}" for k, v in sorted(a.get("labels", {}).items())),
            _resources(a.get("resources", {}), a.get("resources_free", {})),
        ]
        for a in data["agents"]
    ]
    headers = [
        "NAME",
        "STATUS",
        "QUEUES",
        "RUNNING",
        "LAUNCHER",
        "LAST HEARTBEAT",
        "VERSION",
        "LOCATIONS",
        "LABELS",
        "RESOURCES (FREE/OFFERED)",
    ]
    emit(args, data, table(rows, headers))
    return 0


def _resources(offered: dict[str, int], free: dict[str, int]) -> str:
    return ", ".join(f"{name} {free.get(name, n)}/{n}" for name, n in sorted(offered.items()))


def cmd_jobs_list(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("GET", "/jobs")
    rows = [
        [
            j["name"],
            j["location"],
            len(j["ops"]),
            j["executor"],
            ", ".join(j["agents"]),
            ", ".join(short_version(v) for v in j.get("code_versions", [])),
        ]
        for j in data["jobs"]
    ]
    text = table(rows, ["JOB", "LOCATION", "OPS", "EXECUTOR", "AGENTS", "CODE"])
    for err in data["location_errors"]:
        first_line = err["error"].splitlines()[0] if err["error"] else ""
        if err.get("serving_version"):
            text += f"\nlocation {err['location']} on {err['agent']}: {first_line}"
        else:
            text += f"\nlocation {err['location']} on {err['agent']} failed to load: {first_line}"
    emit(args, data, text)
    return 0


def cmd_health(args: argparse.Namespace, client: ApiClient) -> int:
    """GET /readyz: exit 0 when storage answers and every daemon loop beats, else 1; the
    control plane's version on the first line."""
    data = client.request("GET", "/readyz", prefix="")
    rows = [
        [name, f"{loop.get('seconds_since_beat', 0):.1f}", loop.get("last_error") or ""]
        for name, loop in sorted(data.get("loops", {}).items())
    ]
    version = data.get("version") or "unknown"
    text = f"{data['status']}  (control plane {version})\n\n"
    emit(args, data, text + table(rows, ["LOOP", "LAST BEAT (S)", "LAST ERROR"]))
    return 0
