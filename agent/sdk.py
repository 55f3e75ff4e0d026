"""The job SDK: what user code imports to define ops, jobs, schedules and sensors.

`@job` runs its body once, at definition time, with a tracing context active: each op
call inside it records a node of the graph and returns a handle that downstream ops take
as arguments. The graph is therefore known (and validated) before any run starts.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import random
import re
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Any

from protocol.messages import JobInfo, OpInfo

__all__ = [
    "Backoff",
    "DefaultScheduleStatus",
    "DefaultSensorStatus",
    "DefinitionError",
    "Definitions",
    "Failure",
    "Jitter",
    "JobDefinition",
    "Node",
    "OpContext",
    "OpDefinition",
    "OpOutput",
    "RetryPolicy",
    "RetryRequested",
    "RunRequest",
    "ScheduleDefinition",
    "SensorDefinition",
    "SkipReason",
    "build_op_context",
    "job",
    "op",
    "schedule",
    "sensor",
]

NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,128}$")


class DefinitionError(Exception):
    """A definition (op, job, schedule, sensor, Definitions) is invalid."""


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise DefinitionError(f"{kind} name {name!r} must match ^[A-Za-z0-9_]{{1,128}}$")
    return name


def _check_tags(kind: str, name: str, tags: dict[str, str] | None) -> dict[str, str]:
    tags = dict(tags or {})
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise DefinitionError(f"{kind} {name}: tag keys and values must be strings")
    return tags


class Backoff(Enum):
    LINEAR = "LINEAR"
    EXPONENTIAL = "EXPONENTIAL"


class Jitter(Enum):
    FULL = "FULL"
    PLUS_MINUS = "PLUS_MINUS"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and after what delay a failed step is retried (Dagster's semantics)."""

    max_retries: int = 1
    delay: float | None = None
    backoff: Backoff | None = None
    jitter: Jitter | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise DefinitionError("RetryPolicy.max_retries must be an integer")
        if self.max_retries < 0:
            raise DefinitionError("RetryPolicy.max_retries must be >= 0")
        if self.delay is not None and self.delay < 0:
            raise DefinitionError("RetryPolicy.delay must be >= 0")
        if self.delay is None and (self.backoff is not None or self.jitter is not None):
            raise DefinitionError("RetryPolicy: backoff and jitter need a delay")

    def calculate_delay(self, attempt_num: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry `attempt_num` (1 for the first retry)."""
        if self.delay is None:
            return 0.0
        rng = rng or random.Random()
        if self.backoff == Backoff.LINEAR:
            base = attempt_num * self.delay
        elif self.backoff == Backoff.EXPONENTIAL:
            base = ((2**attempt_num) - 1) * self.delay
        else:
            base = self.delay
        if self.jitter == Jitter.FULL:
            return rng.random() * base
        if self.jitter == Jitter.PLUS_MINUS:
            return max(0.0, base + rng.uniform(-self.delay, self.delay))
        return base


class RetryRequested(Exception):
    """Raised by an op to ask for a retry regardless of its retry policy."""

    def __init__(self, max_retries: int = 1, seconds_to_wait: float = 0) -> None:
        super().__init__(f"retry requested (max_retries={max_retries})")
        self.max_retries = max_retries
        self.seconds_to_wait = seconds_to_wait


class Failure(Exception):
    """Raised by an op to fail with a description; `allow_retries=False` skips retries."""

    def __init__(
        self, description: str = "", metadata: dict | None = None, allow_retries: bool = True
    ) -> None:
        super().__init__(description)
        self.description = description
        self.metadata = metadata or {}
        self.allow_retries = allow_retries


class OpContext:
    """What an op receives as `context` (see DESIGN.md, Job SDK)."""

    def __init__(
        self,
        run_id: str,
        job_name: str,
        tags: dict[str, str],
        run_config: dict[str, Any],
        step: str,
        retry_number: int,
        log: logging.Logger,
    ) -> None:
        self.run_id = run_id
        self.job_name = job_name
        self.tags = tags
        self.run_config = run_config
        self.step = step
        self.retry_number = retry_number
        self.log = log


def build_op_context(**overrides: Any) -> OpContext:
    """A context for calling an op directly in a unit test."""
    values: dict[str, Any] = {
        "run_id": "test-run",
        "job_name": "test_job",
        "tags": {},
        "run_config": {},
        "step": "test_step",
        "retry_number": 0,
        "log": logging.getLogger("fleetrun.test"),
    }
    values.update(overrides)
    return OpContext(**values)


@dataclass(frozen=True)
class OpOutput:
    """The handle an op call returns inside a job body: "the output of step `step`"."""

    step: str


@dataclass
class Node:
    name: str
    op: OpDefinition
    upstream: list[str]


class _GraphBuilder:
    def __init__(self, job_name: str) -> None:
        self.job_name = job_name
        self.nodes: dict[str, Node] = {}
        self.counts: dict[str, int] = {}

    def add(self, op_def: OpDefinition, args: tuple[Any, ...], kwargs: dict[str, Any]) -> OpOutput:
        if kwargs:
            raise DefinitionError(
                f"job {self.job_name}: op {op_def.name} takes upstream outputs as positional "
                "arguments only"
            )
        if len(args) != len(op_def.input_names):
            raise DefinitionError(
                f"job {self.job_name}: op {op_def.name} takes {len(op_def.input_names)} inputs "
                f"({', '.join(op_def.input_names) or 'none'}), got {len(args)}"
            )
        for i, arg in enumerate(args):
            if not isinstance(arg, OpOutput):
                raise DefinitionError(
                    f"job {self.job_name}: argument {i + 1} of op {op_def.name} must be the "
                    f"result of another op call, got {type(arg).__name__}"
                )
        count = self.counts.get(op_def.name, 0) + 1
        self.counts[op_def.name] = count
        step = op_def.name if count == 1 else f"{op_def.name}_{count}"
        self.nodes[step] = Node(name=step, op=op_def, upstream=[a.step for a in args])
        return OpOutput(step)


_building: contextvars.ContextVar[_GraphBuilder | None] = contextvars.ContextVar(
    "fleetrun_graph_builder", default=None
)


class OpDefinition:
    def __init__(
        self,
        fn: Callable[..., Any],
        name: str | None = None,
        tags: dict[str, str] | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.fn = fn
        self.name = _check_name("op", name or fn.__name__)
        self.tags = _check_tags("op", self.name, tags)
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise DefinitionError(f"op {self.name}: retry_policy must be a RetryPolicy")
        self.retry_policy = retry_policy
        params = list(inspect.signature(fn).parameters.values())
        for p in params:
            if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                raise DefinitionError(
                    f"op {self.name}: parameter {p.name!r} must be a plain positional parameter"
                )
        self.takes_context = bool(params) and params[0].name == "context"
        self.input_names = [p.name for p in params[1 if self.takes_context else 0 :]]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        builder = _building.get()
        if builder is None:
            return self.fn(*args, **kwargs)
        return builder.add(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<op {self.name}>"


def _normalise_executor(job_name: str, executor: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(executor, str):
        return {"name": executor}
    if isinstance(executor, dict) and isinstance(executor.get("name"), str):
        return dict(executor)
    raise DefinitionError(
        f"job {job_name}: executor must be a name or a dict with a string 'name', got {executor!r}"
    )


class JobDefinition:
    def __init__(
        self,
        fn: Callable[[], Any],
        name: str | None = None,
        tags: dict[str, str] | None = None,
        executor: str | dict[str, Any] = "in_process",
        op_retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.name = _check_name("job", name or fn.__name__)
        self.tags = _check_tags("job", self.name, tags)
        self.executor = _normalise_executor(self.name, executor)
        self.op_retry_policy = op_retry_policy
        self.description = inspect.getdoc(fn)
        builder = _GraphBuilder(self.name)
        token = _building.set(builder)
        try:
            fn()
        except DefinitionError:
            raise
        except Exception as exc:
            raise DefinitionError(
                f"job {self.name}: body raised {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            _building.reset(token)
        if not builder.nodes:
            raise DefinitionError(f"job {self.name}: the body calls no op")
        self.nodes: dict[str, Node] = builder.nodes

    def retry_policy_for(self, step: str) -> RetryPolicy | None:
        return self.nodes[step].op.retry_policy or self.op_retry_policy

    def to_info(self) -> JobInfo:
        return JobInfo(
            name=self.name,
            ops=[
                OpInfo(name=n.name, upstream=list(dict.fromkeys(n.upstream)), tags=n.op.tags)
                for n in self.nodes.values()
            ],
            tags=self.tags,
            executor=self.executor["name"],
        )

    def __repr__(self) -> str:
        return f"<job {self.name}>"


def op(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    retry_policy: RetryPolicy | None = None,
) -> Any:
    """Define an op; works bare (`@op`) or called (`@op(name=...)`)."""
    if fn is not None:
        return OpDefinition(fn, name, tags, retry_policy)
    return lambda f: OpDefinition(f, name, tags, retry_policy)


def job(
    fn: Callable[[], Any] | None = None,
    *,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    executor: str | dict[str, Any] = "in_process",
    op_retry_policy: RetryPolicy | None = None,
) -> Any:
    """Define a job; its body wires ops by calling them. Bare or called."""
    if fn is not None:
        return JobDefinition(fn, name, tags, executor, op_retry_policy)
    return lambda f: JobDefinition(f, name, tags, executor, op_retry_policy)


@dataclass
class RunRequest:
    run_key: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)
    job_name: str | None = None


@dataclass
class SkipReason:
    skip_message: str = ""


class DefaultScheduleStatus(StrEnum):
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


class DefaultSensorStatus(StrEnum):
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


def _check_cron(schedule_name: str, cron: str) -> str:
    from croniter import croniter

    if not isinstance(cron, str) or len(cron.split()) != 5 or "\n" in cron:
        raise DefinitionError(f"schedule {schedule_name}: cron {cron!r} must have exactly 5 fields")
    try:
        croniter(cron, datetime(2024, 1, 1, tzinfo=UTC)).get_next(datetime)
    except Exception as exc:
        raise DefinitionError(f"schedule {schedule_name}: invalid cron {cron!r}: {exc}") from None
    return cron


def _check_timezone(schedule_name: str, tz: str) -> str:
    if not isinstance(tz, str) or not tz or "\x00" in tz or ".." in tz or tz.startswith("/"):
        raise DefinitionError(f"schedule {schedule_name}: unknown timezone {tz!r}")
    try:
        zoneinfo.ZoneInfo(tz)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise DefinitionError(f"schedule {schedule_name}: unknown timezone {tz!r}") from None
    return tz


class ScheduleDefinition:
    def __init__(
        self,
        fn: Callable[..., Any],
        job: JobDefinition,
        cron: str,
        timezone: str = "UTC",
        name: str | None = None,
        default_status: DefaultScheduleStatus = DefaultScheduleStatus.STOPPED,
        tags: dict[str, str] | None = None,
        catchup: int = 0,
    ) -> None:
        self.name = _check_name("schedule", name or fn.__name__)
        if not isinstance(job, JobDefinition):
            raise DefinitionError(f"schedule {self.name}: job must be a @job")
        self.fn = fn
        self.job = job
        self.cron = _check_cron(self.name, cron)
        self.timezone = _check_timezone(self.name, timezone)
        self.default_status = DefaultScheduleStatus(default_status)
        self.tags = _check_tags("schedule", self.name, tags)
        if catchup < 0:
            raise DefinitionError(f"schedule {self.name}: catchup must be >= 0")
        self.catchup = catchup


class SensorDefinition:
    def __init__(
        self,
        fn: Callable[..., Any],
        job: JobDefinition,
        minimum_interval_seconds: float = 30,
        name: str | None = None,
        default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
    ) -> None:
        self.name = _check_name("sensor", name or fn.__name__)
        if not isinstance(job, JobDefinition):
            raise DefinitionError(f"sensor {self.name}: job must be a @job")
        if minimum_interval_seconds <= 0:
            raise DefinitionError(f"sensor {self.name}: minimum_interval_seconds must be > 0")
        self.fn = fn
        self.job = job
        self.minimum_interval_seconds = minimum_interval_seconds
        self.default_status = DefaultSensorStatus(default_status)


def schedule(
    *,
    job: JobDefinition,
    cron: str,
    timezone: str = "UTC",
    name: str | None = None,
    default_status: DefaultScheduleStatus = DefaultScheduleStatus.STOPPED,
    tags: dict[str, str] | None = None,
    catchup: int = 0,
) -> Callable[[Callable[..., Any]], ScheduleDefinition]:
    return lambda fn: ScheduleDefinition(
        fn, job, cron, timezone, name, default_status, tags, catchup
    )


def sensor(
    *,
    job: JobDefinition,
    minimum_interval_seconds: float = 30,
    name: str | None = None,
    default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
) -> Callable[[Callable[..., Any]], SensorDefinition]:
    return lambda fn: SensorDefinition(fn, job, minimum_interval_seconds, name, default_status)


class Definitions:
    """Everything one code location defines; the agent finds it by type in the module."""

    def __init__(
        self,
        jobs: list[JobDefinition] | None = None,
        schedules: list[ScheduleDefinition] | None = None,
        sensors: list[SensorDefinition] | None = None,
    ) -> None:
        self.jobs: dict[str, JobDefinition] = {}
        self.schedules: dict[str, ScheduleDefinition] = {}
        self.sensors: dict[str, SensorDefinition] = {}
        for j in jobs or []:
            if not isinstance(j, JobDefinition):
                raise DefinitionError(f"Definitions: {j!r} is not a @job")
            if j.name in self.jobs:
                raise DefinitionError(f"Definitions: two jobs are named {j.name!r}")
            self.jobs[j.name] = j
        for kind, items, target in (
            ("schedule", schedules or [], self.schedules),
            ("sensor", sensors or [], self.sensors),
        ):
            for item in items:
                if item.name in target:
                    raise DefinitionError(f"Definitions: two {kind}s are named {item.name!r}")
                target[item.name] = item
                known = self.jobs.setdefault(item.job.name, item.job)
                if known is not item.job:
                    raise DefinitionError(
                        f"Definitions: {kind} {item.name} targets a different job also named "
                        f"{item.job.name!r}"
                    )

    def get_job(self, name: str) -> JobDefinition:
        try:
            return self.jobs[name]
        except KeyError:
            raise KeyError(f"no job named {name!r} in this code location") from None
