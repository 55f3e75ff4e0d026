"""Rules for names, cron strings and time zones, shared by both sides.

The SDK applies them when user code defines a job or schedule; the control plane applies
them again to what an agent registers, because an agent's messages are untrusted input
(a cron string or time-zone key reaches croniter and zoneinfo on the control plane).
"""

from __future__ import annotations

import math
import re
import zoneinfo
from datetime import UTC, datetime

from croniter import croniter

from protocol.messages import CodeLocationInfo, JobInfo, RetryPolicyInfo
from protocol.tags import MAX_RESOURCE, RESOURCE_NAMES, code_version_ok, tag_problem
from protocol.wire import text_problem

MAX_NAME_LENGTH = 128
NAME_RE = re.compile(r"[A-Za-z0-9_]+")
# IANA keys only: letters, digits, `_+-`, joined by single slashes. Rejects anything
# path-like ("..", leading "/", backslashes, NUL) before zoneinfo touches the filesystem.
TZ_KEY_RE = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*")
# A fixed start keeps cron validation deterministic (same verdict whenever it runs).
_CRON_PROBE_START = datetime(2024, 1, 1, tzinfo=UTC)
MAX_CRON_LENGTH = 256
MAX_CATCHUP = 10_000
MAX_SENSOR_INTERVAL = 365 * 86400.0
# The run statuses a run status sensor may watch (every status a run can change to).
SENSOR_RUN_STATUSES = (
    "QUEUED",
    "STARTING",
    "STARTED",
    "SUCCESS",
    "FAILURE",
    "CANCELING",
    "CANCELED",
)
MAX_MONITORED_JOBS = 1000
MAX_STEP_RETRIES = 10_000


AGENT_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,253}")  # host names qualify


def agent_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not AGENT_NAME_RE.fullmatch(name):
        return "must match ^[A-Za-z0-9_.-]{1,253}$ (a host name qualifies)"
    return None


def name_problem(name: object) -> str | None:
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        return f"must match ^[A-Za-z0-9_]+$ and be at most {MAX_NAME_LENGTH} characters"
    return None


def cron_problem(cron: object) -> str | None:
    """Parse and compute one tick, since croniter accepts never-firing expressions."""
    if not isinstance(cron, str) or len(cron) > MAX_CRON_LENGTH:
        return f"must be a string of at most {MAX_CRON_LENGTH} characters"
    if len(cron.split()) != 5 or any(c.isspace() and c not in " \t" for c in cron):
        return "must have exactly 5 fields (minute hour day month weekday) on one line"
    try:
        croniter(cron, _CRON_PROBE_START).get_next(datetime)
    except Exception as exc:
        return f"is invalid: {type(exc).__name__}: {exc}"
    return None


def timezone_problem(timezone: object) -> str | None:
    if not isinstance(timezone, str) or not TZ_KEY_RE.fullmatch(timezone):
        return "is not an IANA time zone name"
    try:
        zoneinfo.ZoneInfo(timezone)
    except (ValueError, OSError, zoneinfo.ZoneInfoNotFoundError):
        return "is not a known time zone"
    return None


MAX_CODE_VERSIONS = 200


def location_problem(info: CodeLocationInfo) -> str | None:
    """What is wrong with a code location as an agent describes it; None if nothing."""
    where = f"code location {info.name[:MAX_NAME_LENGTH]!r}"
    if name_problem(info.name):
        return f"{where}: name {name_problem(info.name)}"
    if len(info.versions) > MAX_CODE_VERSIONS:
        return f"{where}: at most {MAX_CODE_VERSIONS} code versions may be listed"
    for version in (info.version, *info.versions):
        if version and not code_version_ok(version):
            return f"{where}: code version {version[:64]!r} is not letters and digits (<= 64)"
    for job in info.jobs:
        if name_problem(job.name):
            return f"{where}: job name {name_problem(job.name)}"
        if (problem := _job_problem(job)) is not None:
            return f"{where}: job {job.name} {problem}"
    for schedule in info.schedules:
        checks = [
            ("name", name_problem(schedule.name)),
            ("job", name_problem(schedule.job)),
            ("cron", cron_problem(schedule.cron)),
            ("timezone", timezone_problem(schedule.timezone)),
            ("default_status", _status_problem(schedule.default_status)),
            (
                "catchup",
                None
                if 0 <= schedule.catchup <= MAX_CATCHUP
                else f"must be between 0 and {MAX_CATCHUP}",
            ),
            ("tags", tag_problem(schedule.tags)),
        ]
        for field, problem in checks:
            if problem:
                return f"{where}: schedule {schedule.name[:MAX_NAME_LENGTH]!r} {field} {problem}"
    for sensor in info.sensors:
        interval = sensor.minimum_interval_seconds
        checks = [
            ("name", name_problem(sensor.name)),
            ("job", _sensor_job_problem(sensor.job, sensor.run_status)),
            ("default_status", _status_problem(sensor.default_status)),
            ("run_status", _run_status_problem(sensor.run_status)),
            ("monitored_jobs", _monitored_jobs_problem(sensor.monitored_jobs)),
            (
                "minimum_interval_seconds",
                None
                if 0 <= interval <= MAX_SENSOR_INTERVAL
                else f"must be between 0 and {MAX_SENSOR_INTERVAL}",
            ),
        ]
        for field, problem in checks:
            if problem:
                return f"{where}: sensor {sensor.name[:MAX_NAME_LENGTH]!r} {field} {problem}"
    return None


MAX_LABELS = 64


def label_problem(key: str, value: str) -> str | None:
    """Why `key = value` cannot be an agent label (a selector is `k=v,k=v`), or None."""
    for what, text in (("key", key), ("value", value)):
        if not isinstance(text, str) or not 1 <= len(text) <= 128:
            return f"label {what}s must be 1 to 128 characters"
        if any(ch in text for ch in ",= ") or text_problem(text):
            return f"label {what} {text[:64]!r} must be text without ',', '=' or spaces"
    return None


def placement_problem(labels: dict[str, str], resources: dict[str, int]) -> str | None:
    """What is wrong with an agent's labels and resources, naming it; None if nothing."""
    if len(labels) > MAX_LABELS:
        return f"an agent may have at most {MAX_LABELS} labels"
    for key, value in labels.items():
        if (problem := label_problem(key, value)) is not None:
            return problem
    for name, amount in resources.items():
        if name not in RESOURCE_NAMES:
            return f"resources.{name[:64]} is not one of {', '.join(RESOURCE_NAMES)}"
        if type(amount) is not int or not 0 <= amount <= MAX_RESOURCE:
            return f"resources.{name} must be an integer from 0 to {MAX_RESOURCE}"
    return None


def _job_problem(job: JobInfo) -> str | None:
    """Its steps are names (they become events' steps and outputs' keys), wired only to
    one another, and its tags are valid run tags (they become its runs' tags)."""
    steps = {op.name for op in job.ops}
    for op in job.ops:
        if name_problem(op.name):
            return f"step name {op.name[:MAX_NAME_LENGTH]!r} {name_problem(op.name)}"
        if not set(op.upstream) <= steps:
            return f"step {op.name} takes the output of a step the job does not have"
        if any(text_problem(text) for pair in op.tags.items() for text in pair):
            return f"step {op.name} has a tag that is not valid Unicode text"
        if op.retry_policy is not None and (problem := _policy_problem(op.retry_policy)):
            return f"step {op.name} retry_policy {problem}"
        if op.pool is not None and (problem := name_problem(op.pool)):
            return f"step {op.name} pool {problem}"
    problem = tag_problem(job.tags)
    return None if problem is None else f"tags: {problem}"


def _policy_problem(policy: RetryPolicyInfo) -> str | None:
    if not 0 <= policy.max_retries <= MAX_STEP_RETRIES:
        return f"max_retries must be between 0 and {MAX_STEP_RETRIES}"
    if policy.delay is not None and not (math.isfinite(policy.delay) and policy.delay >= 0):
        return "delay must be a finite number >= 0"
    if policy.backoff not in (None, "LINEAR", "EXPONENTIAL"):
        return "backoff must be LINEAR or EXPONENTIAL"
    if policy.jitter not in (None, "FULL", "PLUS_MINUS"):
        return "jitter must be FULL or PLUS_MINUS"
    return None


def _sensor_job_problem(job: str, run_status: str | None) -> str | None:
    """A run status sensor may request no job (it only has side effects)."""
    return None if job == "" and run_status is not None else name_problem(job)


def _run_status_problem(status: str | None) -> str | None:
    if status is None or status in SENSOR_RUN_STATUSES:
        return None
    return f"must be one of {', '.join(SENSOR_RUN_STATUSES)}"


def _monitored_jobs_problem(jobs: list[str]) -> str | None:
    if len(jobs) > MAX_MONITORED_JOBS:
        return f"may name at most {MAX_MONITORED_JOBS} jobs"
    return next((f"{name!r} {p}" for name in jobs if (p := name_problem(name))), None)


def _status_problem(status: str) -> str | None:
    return None if status in ("RUNNING", "STOPPED") else "must be RUNNING or STOPPED"
