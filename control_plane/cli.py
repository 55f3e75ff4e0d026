"""`fleetrun`: run the control plane, an agent or the demo, and talk to a control plane."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import shtab

from control_plane.statuses import EVENT_STATUS, TERMINAL_STATUSES
from control_plane.storage import StorageError
from protocol.logs import FORMATS, redact
from protocol.schema import ConfigError

DEFAULT_URL = "http://127.0.0.1:8470"
LONG_POLL_SECONDS = 20  # held by the server; under its 30 s maximum
EVENT_PAGE = 1000  # the events route's default page size

COMPLETION_HELP = """\
print a shell completion script for fleetrun (generated from its argument parser)

install it once:
  bash   fleetrun completion bash > ~/.local/share/bash-completion/completions/fleetrun
         (or add  eval "$(fleetrun completion bash)"  to ~/.bashrc)
  zsh    fleetrun completion zsh > "${fpath[1]}/_fleetrun"   (then: compinit)
  tcsh   fleetrun completion tcsh > ~/.fleetrun.csh  and add  source ~/.fleetrun.csh
         to ~/.tcshrc
"""


class CliError(Exception):
    """A failure to report to the user in one line; exit code 1."""


class ApiClient:
    """A small synchronous client of the JSON API, for the CLI."""

    def __init__(self, url: str, token: str | None, ca_file: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.where = redact(self.url)  # as messages show it: a password in --url is masked
        self.token = token
        self.context = None
        if self.url.startswith("https://"):
            import ssl

            try:
                self.context = ssl.create_default_context(cafile=ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise CliError(f"cannot use --ca-file {ca_file}: {exc}") from None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: list[tuple[str, str]] | None = None,
        wait: float = 30.0,
        prefix: str = "/api/v1",
    ) -> Any:
        """The decoded JSON answer; any failure becomes one CliError line naming the cause."""
        if not self.url.startswith(("http://", "https://")):
            raise CliError(f"--url / FLEETRUN_URL must start with http:// or https://, "
                           f"got {self.where!r}")  # fmt: skip
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{prefix}{path}{query}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=wait + 30, context=self.context) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise CliError(self._http_error(exc)) from None
        except TimeoutError:
            raise CliError(f"no answer from the control plane at {self.where} "
                           f"within {wait + 30:g} s") from None  # fmt: skip
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach the control plane at {self.where}: {reason}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise CliError(f"{self.where}{prefix}{path} did not answer JSON; is {self.where} a "
                           "fleetrun control plane?") from None  # fmt: skip

    def _http_error(self, exc: urllib.error.HTTPError) -> str:
        """`message (status code)` from the API's error body, plus a hint for a missing token."""
        try:
            err = json.loads(exc.read())["error"]
            text = f"{_one_line(err['message'])} ({exc.code} {err['code']})"
        except (ValueError, KeyError, TypeError, OSError):
            text = f"HTTP {exc.code} {exc.reason} from {self.where}"
        if exc.code == 401 and not self.token:
            text += "; pass --token or set FLEETRUN_TOKEN"
        return text


# --- output helpers ------------------------------------------------------------------


def _one_line(text: Any) -> str:
    """Table cells and error lines stay one line even when a message has several."""
    lines = str(text).strip().splitlines()
    return lines[0] + (" …" if len(lines) > 1 else "") if lines else ""


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [["" if c is None else _one_line(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _emit_line(data: Any) -> None:
    """One JSON document per line (JSON lines) for streams: watch, --follow."""
    print(json.dumps(data, separators=(",", ":")), flush=True)


def _parse_kv(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        if not sep or not key:
            raise CliError(f"{what} must be KEY=VALUE, got {raw!r}")
        out[key] = value
    return out


def _seg(value: str) -> str:
    """A user-typed name or id as one URL path segment."""
    return urllib.parse.quote(value, safe="")


def _when(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


def _clock(iso: str | None) -> str:
    """HH:MM:SS.mmm of an API time: progress lines are read while they happen."""
    return iso[11:23] if iso else ""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.3f} s" if seconds < 1 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _elapsed(start: str | None, end: str | None) -> float | None:
    """Seconds from start to end (or to now while running); None before it starts."""
    begin = _when(start)
    if begin is None:
        return None
    finish = _when(end) or datetime.now(UTC)
    return max(0.0, (finish - begin).total_seconds())


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = kind(raw)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {raw}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


# --- steps, from a run's events -----------------------------------------------------


@dataclass
class StepState:
    name: str
    status: str = "PENDING"
    attempts: int = 0
    first_start: str | None = None
    attempt_start: str | None = None
    end: str | None = None
    attempt_seconds: float | None = None


STEP_END_STATUS = {"STEP_SUCCESS": "SUCCESS", "STEP_FAILURE": "FAILURE",
                   "STEP_SKIPPED": "SKIPPED", "STEP_REUSED": "REUSED"}  # fmt: skip


class StepTracker:
    """Each step's state from the run's events, for `runs show` and `submit --wait`."""

    def __init__(self) -> None:
        self.steps: dict[str, StepState] = {}

    def update(self, ev: dict[str, Any]) -> StepState | None:
        step = ev.get("step")
        kind = ev["type"]
        if not step or not kind.startswith("STEP_"):
            return None
        state = self.steps.setdefault(step, StepState(step))
        if kind in ("STEP_START", "STEP_RESTARTED"):
            state.attempts += 1
            state.status = "RUNNING"
            state.first_start = state.first_start or ev["time"]
            state.attempt_start = ev["time"]
        elif kind == "STEP_UP_FOR_RETRY":
            state.status = "UP_FOR_RETRY"
            state.attempt_seconds = _elapsed(state.attempt_start, ev["time"])
        elif kind in STEP_END_STATUS:
            state.status = STEP_END_STATUS[kind]
            state.end = ev["time"]
            measured = (ev.get("data") or {}).get("duration_seconds")
            state.attempt_seconds = (
                float(measured) if measured is not None
                else _elapsed(state.attempt_start, ev["time"])
            )  # fmt: skip
        return state

    def done(self) -> int:
        return sum(1 for s in self.steps.values() if s.status in STEP_END_STATUS.values())

    def rows(self) -> list[list[Any]]:
        return [[s.name, s.status, s.attempts,
                 _duration(_elapsed(s.first_start, s.end) if s.first_start else None)]
                for s in self.steps.values()]  # fmt: skip


def _progress_line(ev: dict[str, Any], tracker: StepTracker, total: int | None) -> str | None:
    """One line for a run-status change or a step's progress; None for the other events."""
    status = EVENT_STATUS.get(ev["type"])
    when = _clock(ev["time"])
    if status is not None:
        return f"{when}  {status:<9}  {_one_line(ev['message'])}"
    if ev["type"] == "RUN_WORKER_RESTARTED":
        return f"{when}  {'RESTARTED':<9}  {_one_line(ev['message'])}"
    state = tracker.update(ev)
    if state is None:
        return None
    took = _duration(state.attempt_seconds)
    what = {
        "STEP_START": "started",
        "STEP_RESTARTED": f"retry {(ev.get('data') or {}).get('retry_number', '')} started",
        "STEP_SUCCESS": f"succeeded in {took}",
        "STEP_FAILURE": f"failed after {took}: {_one_line(ev['message'])}",
        "STEP_UP_FOR_RETRY": f"failed after {took}, up for retry: {_one_line(ev['message'])}",
        "STEP_SKIPPED": f"skipped: {_one_line(ev['message']).split(': ', 1)[-1]}",
        "STEP_REUSED": _one_line(ev["message"]),
    }.get(ev["type"])
    if what is None:
        return None  # STEP_OUTPUT and the like: noise while waiting
    count = f"[{tracker.done()}/{total}] " if total else ""
    return f"{when}  {'step':<9}  {count}{state.name}: {what}"


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
        page = client.request("GET", f"/runs/{_seg(run_id)}/events", params=params,
                              wait=LONG_POLL_SECONDS)["events"]  # fmt: skip
        for ev in page:
            after = ev["seq"]
            ended = ended or EVENT_STATUS.get(ev["type"]) in TERMINAL_STATUSES
            yield ev
        if page and len(page) >= EVENT_PAGE:
            continue  # more already stored
        if not wait:
            return
        if not page:  # a quiet long-poll: make sure the run has not ended without an event
            run = client.request("GET", f"/runs/{_seg(run_id)}")
            ended = run["status"] in TERMINAL_STATUSES


def _job_size(client: ApiClient, job: str, location: str | None) -> int | None:
    """How many steps the job has, for `[done/total]`; None if it cannot be told."""
    try:
        jobs = client.request("GET", "/jobs")["jobs"]
    except CliError:
        return None
    sizes = {len(j["ops"]) for j in jobs if j["name"] == job
             and (location is None or j["location"] == location)}  # fmt: skip
    return sizes.pop() if len(sizes) == 1 else None


# --- runs ------------------------------------------------------------------------------


def cmd_runs_submit(args: argparse.Namespace, client: ApiClient) -> int:
    """With --wait: step progress on stderr, the outcome on stdout and in the exit code."""
    body: dict[str, Any] = {"job": args.job, "tags": _parse_kv(args.tag, "--tag")}
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
        _emit(args, created, run_id)
        return 0
    progress = None if args.quiet else sys.stderr
    _say(progress, f"submitted run {run_id} of job {args.job}")
    total = _job_size(client, args.job, args.location) if progress else None
    tracker = StepTracker()
    try:
        for ev in _events(client, run_id, follow=True):
            line = _progress_line(ev, tracker, total)
            if line is not None:
                _say(progress, line)
    except KeyboardInterrupt:
        print(f"fleetrun: stopped waiting; run {run_id} goes on (stop it with "
              f"`fleetrun runs cancel {run_id}`)", file=sys.stderr)  # fmt: skip
        return 130
    run = client.request("GET", f"/runs/{_seg(run_id)}")
    reason = f": {run['status_reason']}" if run.get("status_reason") else ""
    _emit(args, run, f"{run_id} {run['status']}{reason}")
    return 0 if run["status"] == "SUCCESS" else 1


def _say(out: TextIO | None, line: str) -> None:
    if out is not None:
        print(line, file=out, flush=True)


def _run_filter(args: argparse.Namespace) -> list[tuple[str, str]]:
    params = [("limit", str(args.limit))]
    if args.status:
        params.append(("status", args.status))
    if args.job:
        params.append(("job", args.job))
    if args.agent:
        params.append(("agent", args.agent))
    for key, value in _parse_kv(args.tag, "--tag").items():
        params.append(("tag", f"{key}:{value}"))
    return params


def _agent_names(client: ApiClient) -> dict[str, str]:
    """Agent id -> name: a run names its agent by id, people know agents by name."""
    try:
        return {a["agent_id"]: a["name"] for a in client.request("GET", "/agents")["agents"]}
    except CliError:
        return {}


def _runs_table(runs: list[dict[str, Any]], names: dict[str, str]) -> str:
    rows = [
        [r["run_id"], r["job"], r["status"], names.get(r["agent"], r["agent"]) if r["agent"]
         else "", r["create_time"], _duration(_elapsed(r.get("start_time"), r.get("end_time")))]
        for r in runs
    ]  # fmt: skip
    return _table(rows, ["RUN ID", "JOB", "STATUS", "AGENT", "CREATED", "DURATION"])


def cmd_runs_list(args: argparse.Namespace, client: ApiClient) -> int:
    params = _run_filter(args)
    if args.cursor:
        params.append(("cursor", args.cursor))
    data = client.request("GET", "/runs", params=params)
    names = _agent_names(client) if data["runs"] and not args.json else {}
    text = _runs_table(data["runs"], names)
    if data["next_cursor"]:
        text += f"\n(more: --cursor {data['next_cursor']})"
    _emit(args, data, text)
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
                names = _agent_names(client) if data["runs"] and not args.json else {}
                problem = ""
            except CliError as exc:
                if refreshes == 0:
                    raise
                data, problem = None, str(exc)
            refreshes += 1
            if args.json:
                _emit_line({"time": now, **(data or {"error": problem})})
            else:
                body = f"refresh failed: {problem}" if data is None else _watch_body(data, names)
                _draw_watch(f"{client.url}  {now}  every {args.interval:g} s", body, redraw)
            if args.count is not None and refreshes >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _watch_body(data: dict[str, Any], names: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for run in data["runs"]:
        counts[run["status"]] = counts.get(run["status"], 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return f"{_runs_table(data['runs'], names)}\n{summary or 'no runs'}"


def _draw_watch(header: str, body: str, redraw: bool) -> None:
    """On a terminal: clear and draw in place. Piped: one table after another."""
    if redraw:
        sys.stdout.write(f"\x1b[H\x1b[2J{header}  (Ctrl-C quits)\n\n{body}\n")
        sys.stdout.flush()
    else:
        print(f"--- {header}\n{body}\n", flush=True)


def _chain_rows(run: dict[str, Any]) -> list[str]:
    """`retry chain:` lines from the API's `chain` (root, retries, re-executions)."""
    lines = []
    counts = {"retry": 0, "reexecution": 0}
    for member in run.get("chain") or []:
        kind = member.get("kind", "original")
        if kind == "original":
            label = "original run"
        else:
            counts[kind] = counts.get(kind, 0) + 1
            label = f"{'retry' if kind == 'retry' else 're-execution'} {counts[kind]}"
        here = "  <- this run" if member["run_id"] == run["run_id"] else ""
        lines.append(f"  {label:<16}{member['run_id']}  {member['status']}{here}")
    return lines


def cmd_runs_show(args: argparse.Namespace, client: ApiClient) -> int:
    run = client.request("GET", f"/runs/{_seg(args.run_id)}")
    events = list(_events(client, args.run_id))
    tracker = StepTracker()
    for ev in events:
        tracker.update(ev)
    if args.json:
        steps = [{"step": s.name, "status": s.status, "attempts": s.attempts,
                  "start_time": s.first_start, "end_time": s.end}
                 for s in tracker.steps.values()]  # fmt: skip
        print(json.dumps({**run, "events": events, "steps": steps}, indent=2))
        return 0
    if run.get("agent"):
        name = _agent_names(client).get(run["agent"])
        run_view = {**run, "agent": f"{name} ({run['agent']})" if name else run["agent"]}
    else:
        run_view = run
    for key in ("run_id", "job", "location", "status", "status_reason", "failure_kind",
                "agent", "lease", "create_time", "start_time", "end_time"):  # fmt: skip
        value = run_view.get(key)
        print(f"{key + ':':<15}{value if value is not None else '-'}")
    print(f"{'duration:':<15}{_duration(_elapsed(run['start_time'], run['end_time'])) or '-'}")
    print(f"{'tags:':<15}{', '.join(f'{k}={v}' for k, v in sorted(run['tags'].items()))}")
    chain = _chain_rows(run)
    if chain:
        print("retry chain:")
        print("\n".join(chain))
    if tracker.steps:
        print()
        print(_table(tracker.rows(), ["STEP", "STATUS", "ATTEMPTS", "TIME"]))
    print()
    rows = [[e["seq"], e["time"], e["type"], e["step"] or "", e["message"]] for e in events]
    print(_table(rows, ["SEQ", "TIME", "EVENT", "STEP", "MESSAGE"]))
    return 0


def cmd_runs_events(args: argparse.Namespace, client: ApiClient) -> int:
    """The event log from --after on; --follow streams it (JSON lines with --json)."""
    types = {t.strip().upper() for t in args.type.split(",")} if args.type else None
    stream = _events(client, args.run_id, args.after, follow=args.follow)
    if not args.follow:
        events = [e for e in stream if types is None or e["type"] in types]
        rows = [[e["seq"], e["time"], e["type"], e["step"] or "", e["message"]] for e in events]
        _emit(args, {"events": events}, _table(rows, ["SEQ", "TIME", "EVENT", "STEP", "MESSAGE"]))
        return 0
    for ev in stream:
        if types is not None and ev["type"] not in types:
            continue
        if args.json:
            _emit_line(ev)
        else:
            print(f"{ev['seq']:>5}  {ev['time']}  {ev['type']:<18}  {ev['step'] or '':<16}  "
                  f"{_one_line(ev['message'])}".rstrip(), flush=True)  # fmt: skip
    return 0


class LogPrinter:
    """Writes chunks to stdout/stderr, each line prefixed with its step. A chunk may end
    mid-line (a print's text and its newline can arrive apart), so the prefix goes only
    where a line starts, and a step's unfinished line is ended before another step's."""

    def __init__(self, prefix: bool) -> None:
        self.prefix = prefix
        self.open: dict[str, str] = {}  # stream -> the step whose line is unfinished

    def write(self, chunk: dict[str, Any]) -> None:
        stream = chunk["stream"]
        out = sys.stderr if stream == "stderr" else sys.stdout
        label = chunk["step"] or "worker"
        pending = self.open.pop(stream, None)
        if pending is not None and pending != label:
            out.write("\n")
            pending = None
        for piece in chunk["text"].splitlines(keepends=True):
            if pending is None and self.prefix:
                out.write(f"[{label}] ")
            out.write(piece)
            pending = None if piece.endswith(("\n", "\r")) else label
        if pending is not None:
            self.open[stream] = pending
        out.flush()

    def close(self) -> None:
        if self.prefix:
            for stream in self.open:
                (sys.stderr if stream == "stderr" else sys.stdout).write("\n")
        self.open.clear()


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
        chunks = client.request("GET", f"/runs/{_seg(args.run_id)}/logs", params=params,
                                wait=LONG_POLL_SECONDS)["logs"]  # fmt: skip
        for chunk in chunks:
            after = chunk["id"]
            if not args.json:
                printer.write(chunk)
            elif args.follow:
                _emit_line(chunk)
            else:
                collected.append(chunk)
        if not args.follow:
            break
        if not chunks:
            run = client.request("GET", f"/runs/{_seg(args.run_id)}")
            if run["status"] in TERMINAL_STATUSES:
                break
    printer.close()
    if args.json and not args.follow:
        print(json.dumps({"logs": collected}, indent=2))
    return 0


def cmd_runs_cancel(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("POST", f"/runs/{_seg(args.run_id)}/cancel", {})
    _emit(args, data, f"{data['run_id']} {data['status']}")
    return 0


def cmd_runs_reexecute(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("POST", f"/runs/{_seg(args.run_id)}/reexecute",
                          {"strategy": args.strategy})  # fmt: skip
    _emit(args, data, data["run_id"])
    return 0


def cmd_runs_priority(args: argparse.Namespace, client: ApiClient) -> int:
    run = client.request("POST", f"/runs/{_seg(args.run_id)}/priority",
                         {"priority": args.priority})  # fmt: skip
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


# --- schedules and sensors --------------------------------------------------------------


def _location(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    return [("location", args.location)] if args.location else None


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
            last = client.request("GET", f"/sensors/{_seg(s['name'])}/ticks",
                                  params=params)["ticks"]  # fmt: skip
            tick = f"{last[0]['status']} {last[0]['start_time']}" if last else ""
            interval = s.get("minimum_interval_seconds") or ""
            rows.append([s["name"], s["location"], s["status"], interval, tick,
                         s.get("cursor") or ""])  # fmt: skip
        headers = ["NAME", "LOCATION", "STATUS", "INTERVAL", "LAST TICK", "CURSOR"]
    _emit(args, data, _table(rows, headers))
    return 0


def _ticks_table(ticks: list[dict[str, Any]], kind: str) -> str:
    """Sensor ticks have no scheduled time: that column is for schedules only."""
    rows = []
    for t in ticks:
        runs = ", ".join(t["run_ids"][:3])
        if len(t["run_ids"]) > 3:
            runs += f" +{len(t['run_ids']) - 3}"
        took = _duration(_elapsed(t["start_time"], t["end_time"])) if t["end_time"] else ""
        row = [t["tick_id"], t["status"], t["start_time"], took, runs,
               t["skip_reason"] or t["error"] or ""]  # fmt: skip
        rows.append(row if kind == "sensor" else [*row[:1], t["scheduled_time"], *row[1:]])
    headers = ["TICK", "STATUS", "STARTED", "TOOK", "RUNS", "DETAIL"]
    return _table(rows, headers if kind == "sensor" else ["TICK", "SCHEDULED", *headers[1:]])


def cmd_instigators_show(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("GET", f"/{args.kind}s/{_seg(args.name)}", params=_location(args))
    fields = ["name", "location", "status", "job"]
    if args.kind == "schedule":
        fields += ["cron", "timezone", "catchup"]
    else:
        fields += ["minimum_interval_seconds", "cursor", "last_run_key"]
    lines = [f"{key + ':':<26}{'-' if data.get(key) in (None, '') else data[key]}"
             for key in fields]  # fmt: skip
    if args.kind == "schedule":
        lines.append(f"{'next ticks:':<26}{', '.join(data.get('next_ticks') or []) or '-'}")
    lines.append(f"{'last tick time:':<26}{data.get('last_tick_time') or '-'}")
    recent = data.get("recent_ticks") or []
    lines += ["", "recent ticks:", _ticks_table(recent, args.kind) if recent else "  none yet"]
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_instigators_ticks(args: argparse.Namespace, client: ApiClient) -> int:
    params = [("limit", str(args.limit)), *(_location(args) or [])]
    data = client.request("GET", f"/{args.kind}s/{_seg(args.name)}/ticks", params=params)
    _emit(args, data, _ticks_table(data["ticks"], args.kind))
    return 0


def cmd_instigators_set(args: argparse.Namespace, client: ApiClient) -> int:
    path = f"/{args.kind}s/{_seg(args.name)}/{args.action_path}"
    data = client.request("POST", path, {}, params=_location(args))
    _emit(args, data, f"{data['name']} {data['status']}")
    return 0


# --- agents, jobs, health -----------------------------------------------------------------


def cmd_agents_drain(args: argparse.Namespace, client: ApiClient) -> int:
    data = client.request("POST", f"/agents/{_seg(args.agent)}/{args.action_path}", {})
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


def cmd_health(args: argparse.Namespace, client: ApiClient) -> int:
    """GET /readyz: exit 0 when storage answers and every daemon loop beats, else 1."""
    data = client.request("GET", "/readyz", prefix="")
    rows = [[name, f"{loop.get('seconds_since_beat', 0):.1f}", loop.get("last_error") or ""]
            for name, loop in sorted(data.get("loops", {}).items())]  # fmt: skip
    _emit(
        args, data, f"{data['status']}\n\n" + _table(rows, ["LOOP", "LAST BEAT (S)", "LAST ERROR"])
    )
    return 0


# --- serve, tokens, completion ----------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from control_plane.app import serve
    from control_plane.config import load_control_plane_config
    from protocol.logs import configure_logging

    try:
        config = load_control_plane_config(args.config)
    except ConfigError as exc:
        return _config_fail(exc)
    configure_logging(args.log_format)
    try:
        asyncio.run(serve(config, own_process=True))
    except KeyboardInterrupt:
        pass
    except (OSError, StorageError) as exc:
        return _fail(f"cannot serve: {exc}")
    return 0


def _fail(message: str, code: int = 1) -> int:
    """One line on stderr, masked: errors about storage may quote its URL."""
    print(f"fleetrun: {redact(message)}", file=sys.stderr)
    return code


def _config_fail(exc: ConfigError) -> int:
    """Exit 2 with a line for each problem of the config file, so all are fixed at once."""
    for line in exc.lines:
        _fail(f"config error: {line}")
    return 2


def cmd_migrate(args: argparse.Namespace) -> int:
    """Apply schema migrations, or (--from) copy a whole instance into a new database."""
    import asyncio

    from control_plane.config import load_control_plane_config
    from control_plane.transfer import TransferError, copy_instance, migrate_schema

    try:
        dest = args.to or load_control_plane_config(args.config).storage.url
    except ConfigError as exc:
        return _fail(f"config error: {exc}", 2)
    try:
        if args.source is None:
            before, after = asyncio.run(migrate_schema(dest))
            change = f"{before} -> {after}" if before != after else f"{after} (up to date)"
            _emit(args, {"storage": redact(dest), "from_version": before, "to_version": after},
                  f"{redact(dest)}: schema version {change}")  # fmt: skip
            return 0
        copied = asyncio.run(
            copy_instance(
                args.source,
                dest,
                None
                if args.json
                else lambda table, n: print(f"{table}: {n} rows", file=sys.stderr),
            )
        )
        _emit(args, {"from": redact(args.source), "to": redact(dest), "rows": copied},
              f"copied {sum(copied.values())} rows from {redact(args.source)} to "
              f"{redact(dest)}")  # fmt: skip
        return 0
    except (TransferError, StorageError, ValueError, OSError) as exc:
        return _fail(f"migrate: {exc}")


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

    try:
        return asyncio.run(run())
    except StorageError as exc:  # the database is unreachable, or a token name is taken
        raise CliError(str(exc)) from None


def _print_tokens(args: argparse.Namespace, tokens: list[dict[str, Any]]) -> int:
    rows = [[t["name"], t["kind"], t["role"] or "", "revoked" if t["revoked"] else "active",
             t["create_time"], t["last_used"] or "never"] for t in tokens]  # fmt: skip
    _emit(args, {"tokens": tokens},
          _table(rows, ["NAME", "KIND", "ROLE", "STATE", "CREATED", "LAST USED"]))  # fmt: skip
    return 0


def cmd_tokens_create(args: argparse.Namespace, client: ApiClient) -> int:
    """Prints the token once; only its salted hash is stored."""
    from control_plane.token_api import TokenRequestError, create_token

    role = args.role if args.kind == "user" else None
    if args.kind == "user" and role is None:
        raise CliError("a user token needs --role viewer|operator|admin")
    if args.config:
        try:
            token, record = _with_storage(args.config, lambda storage: create_token(
                storage, args.name, args.kind, role, time.time()))  # fmt: skip
        except TokenRequestError as exc:
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
    if args.config:
        record = _with_storage(args.config, lambda s: s.revoke_token(args.name, time.time()))
        if record is None:
            raise CliError(f"no live token named {args.name!r}")
        data = record.to_json()
    else:
        data = client.request("POST", f"/tokens/{_seg(args.name)}/revoke")
    _emit(args, data, f"revoked token {data['name']}")
    return 0


def cmd_completion(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(shtab.complete(parser, shell=args.shell), end="")
    return 0


# --- the parser -----------------------------------------------------------------------------


def _files(action: argparse.Action) -> argparse.Action:
    """Let the shell completion script offer file names for this option."""
    action.complete = shtab.FILE  # type: ignore[attr-defined]
    return action


def _client_options(cmd: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--json, --url, --token and --ca-file after the subcommand too. SUPPRESS leaves the
    value given before the subcommand (or its default) alone when they are not repeated."""
    group = cmd.add_argument_group("output and connection (also accepted before the command)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="machine-readable output")  # fmt: skip
    group.add_argument("--url", default=argparse.SUPPRESS, help="the control plane")
    group.add_argument("--token", default=argparse.SUPPRESS, help="a user token")
    _files(
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
    cmd.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                     help="runs with this tag (repeat: all of them)")  # fmt: skip
    cmd.add_argument("--limit", type=_positive(int), default=limit,
                     help=f"at most this many runs, newest first (default {limit})")  # fmt: skip


def _add_runs(sub: Any) -> None:
    runs = sub.add_parser("runs", help="submit, watch and inspect runs").add_subparsers(
        dest="action", required=True
    )
    submit = _client_options(runs.add_parser("submit", help="submit a run of JOB"))
    submit.add_argument("job")
    submit.add_argument("--location")
    submit.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--config", help="run config as a JSON object")
    submit.add_argument("--wait", action="store_true",
                        help="show step progress on stderr until the run ends; exit 0 on "
                        "SUCCESS, 1 on FAILURE or CANCELED")  # fmt: skip
    submit.add_argument("-q", "--quiet", action="store_true",
                        help="with --wait: no progress lines")  # fmt: skip
    submit.set_defaults(func=cmd_runs_submit)

    lst = _client_options(runs.add_parser("list", help="list runs, newest first"))
    _run_filter_options(lst, 50)
    lst.add_argument("--cursor", help="the next page, as printed by the previous one")
    lst.set_defaults(func=cmd_runs_list)

    watch = _client_options(runs.add_parser(
        "watch", help="a live table of runs (JSON lines with --json); Ctrl-C quits"))  # fmt: skip
    _run_filter_options(watch, 25)
    watch.add_argument("--interval", type=_positive(float), default=2.0, metavar="SECONDS")
    watch.add_argument("--count", type=_positive(int), metavar="N", help="stop after N refreshes")
    watch.set_defaults(func=cmd_runs_watch)

    show = _client_options(runs.add_parser("show", help="a run, its steps and its event log"))
    show.add_argument("run_id")
    show.set_defaults(func=cmd_runs_show)

    events = _client_options(runs.add_parser("events", help="a run's event log"))
    events.add_argument("run_id")
    events.add_argument("--after", type=int, default=0, metavar="SEQ",
                        help="only events after this sequence number")  # fmt: skip
    events.add_argument("--type", help="only these event types, e.g. STEP_FAILURE,LOG")
    events.add_argument("--follow", action="store_true",
                        help="keep printing new events until the run ends")  # fmt: skip
    events.set_defaults(func=cmd_runs_events)

    logs = _client_options(runs.add_parser(
        "logs", help="a run's compute logs (stdout/stderr of its steps)"))  # fmt: skip
    logs.add_argument("run_id")
    logs.add_argument("--step")
    logs.add_argument("--follow", action="store_true", help="stream until the run ends")
    logs.set_defaults(func=cmd_runs_logs)

    cancel = _client_options(runs.add_parser(
        "cancel", help="cancel a run (queued: at once; running: stops it)"))  # fmt: skip
    cancel.add_argument("run_id")
    cancel.set_defaults(func=cmd_runs_cancel)
    reexecute = _client_options(runs.add_parser(
        "reexecute", help="run a failed or canceled run's job again"))  # fmt: skip
    reexecute.add_argument("run_id")
    reexecute.add_argument("--strategy", choices=["FROM_FAILURE", "ALL_STEPS"],
                           default="FROM_FAILURE")  # fmt: skip
    reexecute.set_defaults(func=cmd_runs_reexecute)
    priority = _client_options(runs.add_parser("priority", help="change a queued run's priority"))
    priority.add_argument("run_id")
    priority.add_argument("priority", type=int)
    priority.set_defaults(func=cmd_runs_priority)


def _add_instigators(sub: Any) -> None:
    for kind in ("schedule", "sensor"):
        group = sub.add_parser(f"{kind}s", help=f"{kind}s and their ticks").add_subparsers(
            dest="action", required=True
        )
        listing = _client_options(group.add_parser("list", help=f"every {kind} and its status"))
        listing.set_defaults(func=cmd_instigators_list, kind=kind)
        commands = [
            ("show", f"a {kind}, its state and recent ticks", cmd_instigators_show),
            ("ticks", f"a {kind}'s ticks, newest first", cmd_instigators_ticks),
            ("start", f"start a {kind}", cmd_instigators_set),
            ("stop", f"stop a {kind}", cmd_instigators_set),
        ]
        for action, help_text, func in commands:
            cmd = _client_options(group.add_parser(action, help=help_text))
            cmd.add_argument("name")
            cmd.add_argument("--location", help="the code location, if the name is ambiguous")
            if action == "ticks":
                cmd.add_argument("--limit", type=_positive(int), default=20)
            cmd.set_defaults(func=func, kind=kind, action_path=action)


def _add_tokens(sub: Any) -> None:
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
        _files(
            cmd.add_argument("--config", help="control-plane.toml: act on its database directly")
        )
        _client_options(cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetrun", description=__doc__)
    parser.add_argument(
        "--url",
        default=os.environ.get("FLEETRUN_URL", DEFAULT_URL),
        help=f"the control plane (env FLEETRUN_URL; default {DEFAULT_URL})",
    )
    parser.add_argument("--token", default=os.environ.get("FLEETRUN_TOKEN"),
                        help="a user token (env FLEETRUN_TOKEN)")  # fmt: skip
    _files(
        parser.add_argument(
            "--ca-file",
            default=os.environ.get("FLEETRUN_CA_FILE"),
            help="CA bundle to verify an https control plane (env FLEETRUN_CA_FILE)",
        )
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the control plane")
    _files(serve.add_argument("--config", help="control-plane.toml (default: all defaults)"))
    agent = sub.add_parser("agent", help="run an agent")
    _files(agent.add_argument("--config", required=True, help="agent.toml"))
    for cmd in (serve, agent):
        cmd.add_argument("--log-format", choices=FORMATS, help="text (default) or JSON lines")
    migrate = sub.add_parser(
        "migrate", help="apply schema migrations; with --from, copy an instance into a new database"
    )
    _files(migrate.add_argument("--config", help="control-plane.toml: its [storage] url"))
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
    queue = _client_options(sub.add_parser(
        "queue", help="queued runs in dequeue order and why each waits"))  # fmt: skip
    queue.set_defaults(func=cmd_queue)
    _add_instigators(sub)
    agents = sub.add_parser("agents", help="agents").add_subparsers(dest="action", required=True)
    _client_options(agents.add_parser("list", help="agents, their load and code locations")
                    ).set_defaults(func=cmd_agents_list)  # fmt: skip
    for action, help_text in (("drain", "stop sending an agent new runs (its runs go on)"),
                              ("undrain", "send an agent new runs again")):  # fmt: skip
        cmd = _client_options(agents.add_parser(action, help=help_text))
        cmd.add_argument("agent", help="agent name or id")
        cmd.set_defaults(func=cmd_agents_drain, action_path=action)
    jobs = sub.add_parser("jobs", help="jobs").add_subparsers(dest="action", required=True)
    _client_options(jobs.add_parser("list", help="jobs of every code location")
                    ).set_defaults(func=cmd_jobs_list)  # fmt: skip
    _add_tokens(sub)
    health = _client_options(
        sub.add_parser(
            "health", help="is the control plane ready (storage, daemon loops)? exit 1 if not"
        )
    )
    health.set_defaults(func=cmd_health)
    completion = sub.add_parser(
        "completion", help="print a shell completion script (bash, zsh, tcsh)",
        description=COMPLETION_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "migrate":
        return cmd_migrate(args)
    if args.command == "agent":
        from agent.cli import run_agent

        return run_agent(args.config, args.log_format)
    if args.command == "demo":
        from control_plane.demo import run_demo

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


if __name__ == "__main__":
    sys.exit(main())
