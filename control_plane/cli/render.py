"""How the CLI shows things to people: tables, times, step progress, log lines."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from control_plane.cli.client import one_line
from control_plane.model.statuses import EVENT_STATUS


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [["" if c is None else one_line(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def emit_line(data: Any) -> None:
    """One JSON document per line (JSON lines) for streams: watch, --follow."""
    print(json.dumps(data, separators=(",", ":")), flush=True)


def seg(value: str) -> str:
    """A user-typed name or id as one URL path segment."""
    return urllib.parse.quote(value, safe="")


def when(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


def clock(iso: str | None) -> str:
    """HH:MM:SS.mmm of an API time: progress lines are read while they happen."""
    return iso[11:23] if iso else ""


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.3f} s" if seconds < 1 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def elapsed(start: str | None, end: str | None) -> float | None:
    """Seconds from start to end (or to now while running); None before it starts."""
    begin = when(start)
    if begin is None:
        return None
    finish = when(end) or datetime.now(UTC)
    return max(0.0, (finish - begin).total_seconds())


@dataclass
class StepState:
    name: str
    status: str = "PENDING"
    attempts: int = 0
    first_start: str | None = None
    attempt_start: str | None = None
    end: str | None = None
    attempt_seconds: float | None = None


STEP_END_STATUS = {
    "STEP_SUCCESS": "SUCCESS",
    "STEP_FAILURE": "FAILURE",
    "STEP_SKIPPED": "SKIPPED",
    "STEP_REUSED": "REUSED",
}


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
            state.attempt_seconds = elapsed(state.attempt_start, ev["time"])
        elif kind in STEP_END_STATUS:
            state.status = STEP_END_STATUS[kind]
            state.end = ev["time"]
            measured = (ev.get("data") or {}).get("duration_seconds")
            state.attempt_seconds = (
                float(measured)
                if measured is not None
                else elapsed(state.attempt_start, ev["time"])
            )
        return state

    def done(self) -> int:
        return sum(1 for s in self.steps.values() if s.status in STEP_END_STATUS.values())

    def rows(self) -> list[list[Any]]:
        return [
            [
                s.name,
                s.status,
                s.attempts,
                duration(elapsed(s.first_start, s.end) if s.first_start else None),
            ]
            for s in self.steps.values()
        ]


def progress_line(ev: dict[str, Any], tracker: StepTracker, total: int | None) -> str | None:
    """One line for a run-status change or a step's progress; None for the other events."""
    status = EVENT_STATUS.get(ev["type"])
    when = clock(ev["time"])
    if status is not None:
        return f"{when}  {status:<9}  {one_line(ev['message'])}"
    if ev["type"] == "RUN_WORKER_RESTARTED":
        return f"{when}  {'RESTARTED':<9}  {one_line(ev['message'])}"
    state = tracker.update(ev)
    if state is None:
        return None
    took = duration(state.attempt_seconds)
    what = {
        "STEP_START": "started",
        "STEP_RESTARTED": f"retry {(ev.get('data') or {}).get('retry_number', '')} started",
        "STEP_SUCCESS": f"succeeded in {took}",
        "STEP_FAILURE": f"failed after {took}: {one_line(ev['message'])}",
        "STEP_UP_FOR_RETRY": f"failed after {took}, up for retry: {one_line(ev['message'])}",
        "STEP_SKIPPED": f"skipped: {one_line(ev['message']).split(': ', 1)[-1]}",
        "STEP_REUSED": one_line(ev["message"]),
    }.get(ev["type"])
    if what is None:
        return None  # STEP_OUTPUT and the like: noise while waiting
    count = f"[{tracker.done()}/{total}] " if total else ""
    return f"{when}  {'step':<9}  {count}{state.name}: {what}"


def runs_table(runs: list[dict[str, Any]], names: dict[str, str]) -> str:
    rows = [
        [
            r["run_id"],
            r["job"],
            r["status"],
            names.get(r["agent"], r["agent"]) if r["agent"] else "",
            r["create_time"],
            duration(elapsed(r.get("start_time"), r.get("end_time"))),
            short_version(r.get("code_version")),
        ]
        for r in runs
    ]
    return table(rows, ["RUN ID", "JOB", "STATUS", "AGENT", "CREATED", "DURATION", "CODE"])


def short_version(version: str | None) -> str:
    """A code version as tables show it: a git commit's first 12 characters."""
    return (version or "")[:12]


def watch_body(data: dict[str, Any], names: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for run in data["runs"]:
        counts[run["status"]] = counts.get(run["status"], 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return f"{runs_table(data['runs'], names)}\n{summary or 'no runs'}"


def draw_watch(header: str, body: str, redraw: bool) -> None:
    """On a terminal: clear and draw in place. Piped: one table after another."""
    if redraw:
        sys.stdout.write(f"\x1b[H\x1b[2J{header}  (Ctrl-C quits)\n\n{body}\n")
        sys.stdout.flush()
    else:
        print(f"--- {header}\n{body}\n", flush=True)


def chain_rows(run: dict[str, Any]) -> list[str]:
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


def ticks_table(ticks: list[dict[str, Any]], kind: str) -> str:
    """Sensor ticks have no scheduled time: that column is for schedules only."""
    rows = []
    for t in ticks:
        runs = ", ".join(t["run_ids"][:3])
        if len(t["run_ids"]) > 3:
            runs += f" +{len(t['run_ids']) - 3}"
        took = duration(elapsed(t["start_time"], t["end_time"])) if t["end_time"] else ""
        row = [
            t["tick_id"],
            t["status"],
            t["start_time"],
            took,
            runs,
            t["skip_reason"] or t["error"] or "",
        ]
        rows.append(row if kind == "sensor" else [*row[:1], t["scheduled_time"], *row[1:]])
    headers = ["TICK", "STATUS", "STARTED", "TOOK", "RUNS", "DETAIL"]
    return table(rows, headers if kind == "sensor" else ["TICK", "SCHEDULED", *headers[1:]])


def say(out: TextIO | None, line: str) -> None:
    if out is not None:
        print(line, file=out, flush=True)
