"""Log lines of both processes: human lines by default, JSON lines with
`--log-format json`, and the run and agent each line is about.

A line about a run carries `run_id` (and `agent`): passed as `extra={"run_id": ...}`, or
taken from `CURRENT_RUN`, which the agent sets for the task that supervises a run, so
every line logged while handling that run is tagged without threading ids through.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

CURRENT_RUN: ContextVar[str | None] = ContextVar("fleetrun_run_id", default=None)
FORMATS = ("text", "json")
ENV_FORMAT = "FLEETRUN_LOG_FORMAT"  # so the agent's helper processes log the same way
_FIELDS = ("run_id", "agent")


class RunContext(logging.Filter):
    """Adds `run_id` (from the call's extra, or the current run) and `agent` (from the
    call's extra, or this process's agent, once `set_agent_name` knows it)."""

    agent: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "run_id", None) is None:
            record.run_id = CURRENT_RUN.get()
        if getattr(record, "agent", None) is None:
            record.agent = RunContext.agent
        return True


def set_agent_name(name: str) -> None:
    """In an agent process: every line from now on names this agent."""
    RunContext.agent = name


class JsonLines(logging.Formatter):
    """One JSON object per line: a message with newlines or quotes cannot forge a line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextLines(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [f"{name}={getattr(record, name)}" for name in _FIELDS
                if getattr(record, name, None) is not None]  # fmt: skip
        return f"{text} [{' '.join(tags)}]" if tags else text


def configure_logging(log_format: str | None = None, level: int = logging.INFO) -> None:
    """Set up the root logger of this process (format from the argument, else from
    $FLEETRUN_LOG_FORMAT, else text) and pass the choice on to child processes."""
    chosen = log_format or os.environ.get(ENV_FORMAT) or "text"
    if chosen not in FORMATS:
        chosen = "text"
    os.environ[ENV_FORMAT] = chosen
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if chosen == "json" else TextLines())
    handler.addFilter(RunContext())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
