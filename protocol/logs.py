"""Log lines of both processes: human lines by default, JSON lines with
`--log-format json`, and the run and agent each line is about.

A line about a run carries `run_id` (and `agent`): passed as `extra={"run_id": ...}`, or
taken from `CURRENT_RUN`, which the agent sets for the task that supervises a run, so
every line logged while handling that run is tagged without threading ids through.

No secret reaches a line, whichever logger writes it (ours, aiohttp's, asyncio's): both
formatters pass message, arguments, exception and stack through `redact`, and an HTTP
parse error is logged without the request text it quotes (see `_parse_error_text`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType

CURRENT_RUN: ContextVar[str | None] = ContextVar("fleetrun_run_id", default=None)
FORMATS = ("text", "json")
ENV_FORMAT = "FLEETRUN_LOG_FORMAT"  # so the agent's helper processes log the same way
_FIELDS = ("run_id", "agent")

MASK = "***"
# A cheap first look (under a microsecond for a usual line): a line without any of these,
# in lower case, holds nothing to mask.
_HINTS = ("fru_", "fra_", "authoriz", "bearer", "cookie", "password", "://")
# scheme://user:PASSWORD@host: the password runs to the last @ of the word (passwords may
# hold @ or /). The possessive \S*+ reads each word once, so a hostile line costs O(n).
_USERINFO = re.compile(r"(://[^\s:@/'\"]*:)(\S*+)")
_SECRETS = re.compile(
    r"""(?P<header>(?:authorization|cookie)['"]?[ \t]*[:=][ \t]*)[^\r\n]*  # to end of line
    | (?P<bearer>\bbearer[ \t]+)[^\s'",;]+
    | (?P<token>fr[ua]_[0-9a-f]{16}_)[^\s'"&;,]+  # a fleetrun token: its id stays
    | (?P<param>\b(?:ssl)?password=)[^\s&;,'"]+  # a DSN's or a query's password
    """,
    re.IGNORECASE | re.VERBOSE,
)
_SAFE_SUMMARY = re.compile(r"[A-Za-z][A-Za-z ]{2,60}:")
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def redact(text: str) -> str:
    """`text` with every secret masked: fleetrun tokens (their id kept), the value of an
    `Authorization` or `Cookie` header, whatever follows `Bearer`, URL passwords
    (`scheme://user:***@host`) and `password=` parameters. One function for log lines,
    error messages and printed URLs, so that all mask alike."""
    if not any(map(text.lower().__contains__, _HINTS)):
        return text
    return _SECRETS.sub(_mask_secret, _USERINFO.sub(_mask_userinfo, text))


def _mask_userinfo(match: re.Match[str]) -> str:
    rest = match.group(2)
    at = rest.rfind("@")
    return match.group(0) if at < 0 else f"{match.group(1)}{MASK}{rest[at:]}"


def _mask_secret(match: re.Match[str]) -> str:
    return f"{match.group(match.lastgroup or 0)}{MASK}"


def _is_parse_error(exc: BaseException) -> bool:
    """An aiohttp HTTP parser error (class names, not an import: agents log too)."""
    return any(
        cls.__name__ == "HttpProcessingError" and cls.__module__ == "aiohttp.http_exceptions"
        for cls in type(exc).__mro__
    )


def _parse_error_text(exc: BaseException) -> str:
    """One line for an HTTP parse error. Its message quotes the raw request line or header
    (a token with a stray control character, an obs-fold line holding only a secret), which
    no pattern can tell apart from harmless text, so only the error's kind is kept."""
    kind = type(exc)
    first, _, rest = str(getattr(exc, "message", "")).partition("\n")
    summary = f" {first[:-1]}" if rest and _SAFE_SUMMARY.fullmatch(first) else ""
    return (
        f"{kind.__module__}.{kind.__qualname__}: {getattr(exc, 'code', '')}{summary} "
        "(the request's text is not logged: it may hold credentials)"
    )


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


class _Redacting(logging.Formatter):
    """The exception part of a line: an HTTP parse error as one line without the request's
    text, any other exception as its traceback (the caller redacts the whole)."""

    def formatException(self, ei: ExcInfo) -> str:
        exc = ei[1]
        if exc is not None and _is_parse_error(exc):
            return _parse_error_text(exc)
        return super().formatException(ei)


class JsonLines(_Redacting):
    """One JSON object per line: a message with newlines or quotes cannot forge a line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


class TextLines(_Redacting):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.exc_text = None  # never reuse a traceback another formatter left unredacted
        text = super().format(record)
        tags = [
            f"{name}={getattr(record, name)}"
            for name in _FIELDS
            if getattr(record, name, None) is not None
        ]
        return redact(f"{text} [{' '.join(tags)}]" if tags else text)


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
