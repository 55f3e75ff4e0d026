"""The job SDK: what user code imports to define ops, jobs, schedules and sensors.

`@job` runs its body once, at definition time, with a tracing context active: each op
call inside it records a node of the graph and returns a handle that downstream ops take
as arguments. The graph is therefore known (and validated) before any run starts, so a
broken definition fails when its code location loads, not in the middle of a run.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum, StrEnum
from typing import Any, overload

from protocol.messages import JobInfo, OpInfo, RetryPolicyInfo
from protocol.tags import tag_problem
from protocol.validation import (
    MAX_NAME_LENGTH,
    NAME_RE,
    SENSOR_RUN_STATUSES,
    cron_problem,
    timezone_problem,
)

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
    "OpInvocation",
    "OpOutput",
    "RetryPolicy",
    "RetryRequested",
    "RunRequest",
    "RunStatusSensorContext",
    "RunStatusSensorDefinition",
    "ScheduleDefinition",
    "ScheduleEvaluationContext",
    "SensorDefinition",
    "SensorEvaluationContext",
    "SkipReason",
    "StepFailure",
    "WatchedRun",
    "build_op_context",
    "job",
    "op",
    "run_failure_sensor",
    "run_status_sensor",
    "schedule",
    "sensor",
]

_NAME_RE = NAME_RE


class DefinitionError(Exception):
    """A definition (op, job, schedule, sensor, Definitions) is invalid."""


def _check_name(kind: str, name: object) -> str:
    """Names end up in URLs, step keys and the database, so keep them to a safe alphabet."""
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise DefinitionError(
            f"{kind} name {name!r} is invalid: it must match ^[A-Za-z0-9_]+$ and be at most "
            f"{MAX_NAME_LENGTH} characters"
        )
    return name


def _default_name(kind: str, name: str | None, fn: Callable[..., Any]) -> str:
    """An explicit `name=` wins; otherwise the function's own name, as in Dagster."""
    return _check_name(kind, name if name is not None else getattr(fn, "__name__", None))


def _check_tags(kind: str, name: str, tags: object) -> dict[str, str]:
    """Tags travel to the control plane as string pairs; a job's and a schedule's become
    its runs' tags, so they meet the rules of run tags here, where the author sees it."""
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise DefinitionError(f"{kind} {name}: tags must be a dict, got {type(tags).__name__}")
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise DefinitionError(
                f"{kind} {name}: tag keys and values must be strings, got {key!r}: {value!r}"
            )
    if kind != "op" and (problem := tag_problem(tags)) is not None:  # they become run tags
        raise DefinitionError(f"{kind} {name}: {problem}")
    return dict(tags)


def _check_pool(where: str, pool: object) -> str | None:
    """A concurrency pool's name meets the rules of every name (it keys the database)."""
    if pool is None:
        return None
    if not isinstance(pool, str) or len(pool) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(pool):
        raise DefinitionError(
            f"{where}: pool {pool!r} is invalid: it must match ^[A-Za-z0-9_]+$ and be at "
            f"most {MAX_NAME_LENGTH} characters"
        )
    return pool


def tag_concurrency_limits(where: str, rules: object) -> list[tuple[str, str | None, int]]:
    """An executor's `tag_concurrency_limits` (Dagster's): a list of {"key", "value"?,
    "limit"} tables, as (key, value or None, limit); ValueError naming the rule."""
    if not isinstance(rules, list):
        raise ValueError(f"{where}: tag_concurrency_limits must be a list of tables")
    parsed = []
    for index, rule in enumerate(rules):
        at = f"{where}: tag_concurrency_limits[{index}]"
        if not isinstance(rule, dict) or not rule.keys() <= {"key", "value", "limit"}:
            raise ValueError(f"{at} must be a table with key, optional value, and limit")
        key, value, limit = rule.get("key"), rule.get("value"), rule.get("limit")
        if not isinstance(key, str) or not key:
            raise ValueError(f"{at}.key must be a non-empty string")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{at}.value must be a string")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"{at}.limit must be an integer >= 1")
        parsed.append((key, value, limit))
    return parsed


def _check_callable(kind: str, fn: object) -> None:
    """Guards against `@op("name")`-style misuse, which would otherwise fail obscurely."""
    if not callable(fn):
        raise DefinitionError(
            f"@{kind} must decorate a function, got {fn!r}; pass options as keywords, "
            f"e.g. @{kind}(name=...)"
        )


def _reject_async_and_generators(kind: str, name: str, fn: Callable[..., Any]) -> None:
    """The executors call functions synchronously, so these would never run their bodies."""
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise DefinitionError(f"{kind} {name}: async functions are not supported")
    if inspect.isgeneratorfunction(fn):
        raise DefinitionError(f"{kind} {name}: generator functions are not supported")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Backoff(Enum):
    """How the retry delay grows with the attempt number."""

    LINEAR = "LINEAR"
    EXPONENTIAL = "EXPONENTIAL"


class Jitter(Enum):
    """Randomisation of the retry delay, so failed steps do not retry in lockstep."""

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
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool):
            raise DefinitionError(
                f"RetryPolicy: max_retries must be an int, got {self.max_retries!r}"
            )
        if self.max_retries < 0:
            raise DefinitionError(f"RetryPolicy: max_retries must be >= 0, got {self.max_retries}")
        if self.delay is not None and (
            not _is_number(self.delay) or not math.isfinite(self.delay) or self.delay < 0
        ):
            raise DefinitionError(
                f"RetryPolicy: delay must be a finite number >= 0 seconds, got {self.delay!r}"
            )
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise DefinitionError(f"RetryPolicy: backoff must be a Backoff, got {self.backoff!r}")
        if self.jitter is not None and not isinstance(self.jitter, Jitter):
            raise DefinitionError(f"RetryPolicy: jitter must be a Jitter, got {self.jitter!r}")
        if self.delay is None and (self.backoff is not None or self.jitter is not None):
            raise DefinitionError("RetryPolicy: backoff and jitter need a delay")

    def calculate_delay(self, attempt_num: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry `attempt_num` (1 for the first retry)."""
        if attempt_num < 1:
            raise ValueError(f"attempt_num starts at 1, got {attempt_num}")
        if self.delay is None:
            return 0.0
        delay = float(self.delay)
        if self.backoff is Backoff.LINEAR:
            base = attempt_num * delay
        elif self.backoff is Backoff.EXPONENTIAL:
            base = ((2**attempt_num) - 1) * delay
        else:
            base = delay
        if self.jitter is None:
            return base
        rng = rng if rng is not None else random.Random()
        if self.jitter is Jitter.FULL:
            return rng.uniform(0.0, 1.0) * base
        return max(0.0, base + rng.uniform(-delay, delay))


class RetryRequested(Exception):
    """Raised by an op to ask for a retry regardless of its retry policy."""

    def __init__(self, max_retries: int = 1, seconds_to_wait: float = 0) -> None:
        super().__init__(
            f"retry requested (max_retries={max_retries}, seconds_to_wait={seconds_to_wait})"
        )
        self.max_retries = max_retries
        self.seconds_to_wait = seconds_to_wait


class Failure(Exception):
    """Raised by an op to fail with a description; `allow_retries=False` skips retries."""

    def __init__(
        self,
        description: str = "",
        metadata: dict[str, Any] | None = None,
        allow_retries: bool = True,
    ) -> None:
        super().__init__(description)
        self.description = description
        self.metadata: dict[str, Any] = dict(metadata) if metadata else {}
        self.allow_retries = allow_retries


class OpContext:
    """What an op receives as `context`; the executor builds one per attempt."""

    def __init__(
        self,
        run_id: str,
        job_name: str,
        tags: dict[str, str],
        run_config: dict[str, Any],
        step: str,
        retry_number: int,
        log: logging.Logger,
        lease: int = 0,
    ) -> None:
        self.run_id = run_id
        self.job_name = job_name
        self.tags = tags
        self.run_config = run_config
        self.step = step
        self.retry_number = retry_number
        self.log = log
        # The attempt's lease: it only grows, so external sinks can refuse stale writers.
        self.lease = lease

    def __repr__(self) -> str:
        return (
            f"OpContext(run_id={self.run_id!r}, job_name={self.job_name!r}, "
            f"step={self.step!r}, retry_number={self.retry_number})"
        )


def build_op_context(
    *,
    run_id: str = "test-run",
    job_name: str = "test_job",
    tags: dict[str, str] | None = None,
    run_config: dict[str, Any] | None = None,
    step: str = "test_step",
    retry_number: int = 0,
    log: logging.Logger | None = None,
    lease: int = 0,
) -> OpContext:
    """A context for calling an op directly in a unit test, without a run."""
    return OpContext(
        run_id=run_id,
        job_name=job_name,
        tags=dict(tags) if tags else {},
        run_config=dict(run_config) if run_config else {},
        step=step,
        retry_number=retry_number,
        log=log if log is not None else logging.getLogger("fleetrun.test"),
        lease=lease,
    )


@dataclass(frozen=True)
class OpOutput:
    """The handle an op call returns inside a job body: "the output of step `step`"."""

    step: str


@dataclass
class Node:
    """One step of a job: an op invocation and the steps whose outputs it takes, in order.

    `retry_policy` and `invocation_tags` are what the invocation itself set (with
    `with_retry_policy` and `tag`); the op's own settings stay on `op`.
    """

    name: str
    op: OpDefinition
    upstream: list[str]
    retry_policy: RetryPolicy | None = None
    invocation_tags: dict[str, str] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, str]:
        """The op's tags, overridden key by key by the invocation's (as Dagster merges them)."""
        return {**self.op.tags, **self.invocation_tags}


class _GraphBuilder:
    """Collects the nodes of one job while its body runs."""

    def __init__(self, job_name: str) -> None:
        self.job_name = job_name
        self.nodes: dict[str, Node] = {}
        # The handles this job issued, so a handle leaked from another job is caught.
        self.outputs: dict[str, OpOutput] = {}
        self.calls: dict[str, int] = {}

    def _step_name(self, op_name: str) -> str:
        """`name`, `name_2`, `name_3`, ... skipping names already taken by another op."""
        count = self.calls.get(op_name, 0)
        while True:
            count += 1
            candidate = op_name if count == 1 else f"{op_name}_{count}"
            if candidate not in self.nodes:
                self.calls[op_name] = count
                return candidate

    def add(
        self,
        op_def: OpDefinition,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        invocation: OpInvocation | None = None,
    ) -> OpOutput:
        alias = invocation.given_alias if invocation is not None else None
        where = f"job {self.job_name}: op {op_def.name}"
        if alias is not None:
            where += f" (as {alias})"
        if kwargs:
            raise DefinitionError(
                f"{where} takes upstream outputs as positional arguments only, "
                f"got keyword arguments {sorted(kwargs)}"
            )
        expected = len(op_def.input_names)
        if len(args) != expected:
            listed = ", ".join(op_def.input_names) or "none"
            raise DefinitionError(
                f"{where} takes {expected} input{'' if expected == 1 else 's'} ({listed}), "
                f"got {len(args)}"
            )
        for position, arg in enumerate(args, start=1):
            if not isinstance(arg, OpOutput):
                raise DefinitionError(
                    f"{where}: argument {position} must be the result of another op call "
                    f"in this job, got {type(arg).__name__}"
                )
            if self.outputs.get(arg.step) is not arg:
                raise DefinitionError(
                    f"{where}: argument {position} is the output of step {arg.step!r}, "
                    "which was not called in this job's body"
                )
        if alias is None:
            step = self._step_name(op_def.name)
        elif alias in self.nodes:
            # Step names key events, logs and outputs, so two steps cannot share one.
            raise DefinitionError(
                f"{where}: the job already has a step named {alias!r}; "
                "give each invocation its own alias"
            )
        else:
            step = alias
        self.nodes[step] = Node(
            name=step,
            op=op_def,
            upstream=[a.step for a in args],
            retry_policy=invocation.retry_policy if invocation is not None else None,
            invocation_tags=dict(invocation.tags) if invocation is not None else {},
        )
        output = OpOutput(step)
        self.outputs[step] = output
        return output


_current_builder: contextvars.ContextVar[_GraphBuilder | None] = contextvars.ContextVar(
    "fleetrun_graph_builder", default=None
)


class OpDefinition:
    """A unit of work; calling it records a step inside a job body, or runs it outside one."""

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str | None = None,
        tags: dict[str, str] | None = None,
        retry_policy: RetryPolicy | None = None,
        pool: str | None = None,
    ) -> None:
        _check_callable("op", fn)
        self.fn = fn
        self.name = _default_name("op", name, fn)
        self.tags = _check_tags("op", self.name, tags)
        self.pool = _check_pool(f"op {self.name}", pool)
        if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
            raise DefinitionError(
                f"op {self.name}: retry_policy must be a RetryPolicy, got {retry_policy!r}"
            )
        self.retry_policy = retry_policy
        _reject_async_and_generators("op", self.name, fn)
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError) as exc:
            raise DefinitionError(f"op {self.name}: cannot read its signature: {exc}") from None
        for param in params:
            if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                raise DefinitionError(
                    f"op {self.name}: parameter {param.name!r} must be a plain positional "
                    "parameter (no *args, **kwargs or keyword-only parameters)"
                )
        self.takes_context = bool(params) and params[0].name == "context"
        self.input_names = [p.name for p in params[1 if self.takes_context else 0 :]]
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        builder = _current_builder.get()
        if builder is None:
            return self.fn(*args, **kwargs)
        return builder.add(self, args, kwargs)

    def alias(self, name: str) -> OpInvocation:
        """This op under another step name, so one job can invoke it more than once by name."""
        return OpInvocation(self).alias(name)

    def with_retry_policy(self, retry_policy: RetryPolicy) -> OpInvocation:
        """This op with a retry policy for one invocation, over the op's and the job's."""
        return OpInvocation(self).with_retry_policy(retry_policy)

    def tag(self, tags: dict[str, str]) -> OpInvocation:
        """This op with extra tags for one invocation (e.g. its `fleetrun/priority`)."""
        return OpInvocation(self).tag(tags)

    def __repr__(self) -> str:
        return f"<op {self.name}>"


@dataclass(frozen=True)
class OpInvocation:
    """An op with settings for one invocation (Dagster's PendingNodeInvocation).

    `alias`, `with_retry_policy` and `tag` return new values and chain in any order; call
    the result like the op. Validation happens here, where the author wrote the call.
    """

    op: OpDefinition
    given_alias: str | None = None
    retry_policy: RetryPolicy | None = None
    tags: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.op, OpDefinition):
            raise DefinitionError(f"OpInvocation: op must be an @op, got {self.op!r}")
        if self.given_alias is not None:
            _check_name(f"op {self.op.name}: alias", self.given_alias)
        if self.retry_policy is not None and not isinstance(self.retry_policy, RetryPolicy):
            raise DefinitionError(
                f"op {self.op.name}: with_retry_policy takes a RetryPolicy, "
                f"got {self.retry_policy!r}"
            )
        # A copy, so the caller's dict cannot change a value that looks frozen.
        object.__setattr__(self, "tags", _check_tags("op", self.op.name, self.tags))

    def alias(self, name: str) -> OpInvocation:
        """The same invocation under step name `name`."""
        return replace(self, given_alias=name)

    def with_retry_policy(self, retry_policy: RetryPolicy) -> OpInvocation:
        """The same invocation with its own retry policy, which wins over the op's and job's."""
        if not isinstance(retry_policy, RetryPolicy):
            raise DefinitionError(
                f"op {self.op.name}: with_retry_policy takes a RetryPolicy, got {retry_policy!r}"
            )
        return replace(self, retry_policy=retry_policy)

    def tag(self, tags: dict[str, str]) -> OpInvocation:
        """The same invocation with `tags` added over the ones it has."""
        added = _check_tags("op", self.op.name, tags)
        return replace(self, tags={**self.tags, **added})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        builder = _current_builder.get()
        if builder is None:
            return self.op.fn(*args, **kwargs)
        return builder.add(self.op, args, kwargs, self)


def _normalise_executor(job_name: str, executor: object) -> dict[str, Any]:
    """Executors are looked up by name at run time; the dict form adds their options."""
    if isinstance(executor, str):
        config: dict[str, Any] = {"name": executor}
    elif isinstance(executor, dict) and isinstance(executor.get("name"), str):
        config = dict(executor)
    else:
        raise DefinitionError(
            f"job {job_name}: executor must be a name or a dict with a string 'name', "
            f"got {executor!r}"
        )
    if not _NAME_RE.fullmatch(config["name"]):
        raise DefinitionError(f"job {job_name}: executor name {config['name']!r} is invalid")
    limit = config.get("max_concurrent")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise DefinitionError(
            f"job {job_name}: executor max_concurrent must be a positive int, got {limit!r}"
        )
    if "tag_concurrency_limits" in config:
        try:
            tag_concurrency_limits(f"job {job_name}: executor", config["tag_concurrency_limits"])
        except ValueError as exc:
            raise DefinitionError(str(exc)) from None
    return config


class JobDefinition:
    """A graph of op invocations plus how to run it; built by tracing the body once."""

    def __init__(
        self,
        fn: Callable[[], Any],
        name: str | None = None,
        tags: dict[str, str] | None = None,
        executor: str | dict[str, Any] = "in_process",
        op_retry_policy: RetryPolicy | None = None,
        pool: str | None = None,
    ) -> None:
        _check_callable("job", fn)
        self.name = _default_name("job", name, fn)
        self.tags = _check_tags("job", self.name, tags)
        self.pool = _check_pool(f"job {self.name}", pool)
        self.executor = _normalise_executor(self.name, executor)
        if op_retry_policy is not None and not isinstance(op_retry_policy, RetryPolicy):
            raise DefinitionError(
                f"job {self.name}: op_retry_policy must be a RetryPolicy, got {op_retry_policy!r}"
            )
        self.op_retry_policy = op_retry_policy
        self.description: str | None = inspect.getdoc(fn)
        self.nodes: dict[str, Node] = self._trace(fn)

    def _trace(self, fn: Callable[[], Any]) -> dict[str, Node]:
        _reject_async_and_generators("job", self.name, fn)
        try:
            inspect.signature(fn).bind()
        except TypeError:
            raise DefinitionError(f"job {self.name}: the body must take no arguments") from None
        except ValueError:
            pass
        builder = _GraphBuilder(self.name)
        token = _current_builder.set(builder)
        try:
            fn()
        except DefinitionError:
            raise
        except Exception as exc:
            raise DefinitionError(
                f"job {self.name}: body raised {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            _current_builder.reset(token)
        if not builder.nodes:
            raise DefinitionError(f"job {self.name}: the body calls no op")
        return builder.nodes

    def retry_policy_for(self, step_name: str) -> RetryPolicy | None:
        """The most specific policy wins, as in Dagster: the invocation's
        (`with_retry_policy`), else the op's, else the job-wide default, else None."""
        try:
            node = self.nodes[step_name]
        except KeyError:
            raise KeyError(f"job {self.name} has no step named {step_name!r}") from None
        if node.retry_policy is not None:
            return node.retry_policy
        if node.op.retry_policy is not None:
            return node.op.retry_policy
        return self.op_retry_policy

    def pool_for(self, step_name: str) -> str | None:
        """The concurrency pool a step takes a slot in: its op's, else the job's default."""
        op_pool = self.nodes[step_name].op.pool
        return op_pool if op_pool is not None else self.pool

    def to_info(self) -> JobInfo:
        """What the agent reports to the control plane about this job."""
        return JobInfo(
            name=self.name,
            ops=[
                OpInfo(
                    name=node.name,
                    upstream=list(dict.fromkeys(node.upstream)),
                    tags=node.tags,
                    retry_policy=_policy_info(self.retry_policy_for(node.name)),
                    pool=self.pool_for(node.name),
                )
                for node in self.nodes.values()
            ],
            tags=dict(self.tags),
            executor=self.executor["name"],
        )

    def __repr__(self) -> str:
        return f"<job {self.name}>"


def _policy_info(policy: RetryPolicy | None) -> RetryPolicyInfo | None:
    if policy is None:
        return None
    return RetryPolicyInfo(
        max_retries=policy.max_retries,
        delay=None if policy.delay is None else float(policy.delay),
        backoff=None if policy.backoff is None else policy.backoff.value,
        jitter=None if policy.jitter is None else policy.jitter.value,
    )


@overload
def op(fn: Callable[..., Any], /) -> OpDefinition: ...


@overload
def op(
    *,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    retry_policy: RetryPolicy | None = None,
    pool: str | None = None,
) -> Callable[[Callable[..., Any]], OpDefinition]: ...


def op(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    retry_policy: RetryPolicy | None = None,
    pool: str | None = None,
) -> OpDefinition | Callable[[Callable[..., Any]], OpDefinition]:
    """Define an op; works bare (`@op`) or called (`@op(name=...)`). With `pool`, each
    attempt of its steps takes a slot of that concurrency pool before it starts."""
    if fn is not None:
        return OpDefinition(fn, name, tags, retry_policy, pool)

    def decorate(f: Callable[..., Any]) -> OpDefinition:
        return OpDefinition(f, name, tags, retry_policy, pool)

    return decorate


@overload
def job(fn: Callable[[], Any], /) -> JobDefinition: ...


@overload
def job(
    *,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    executor: str | dict[str, Any] = "in_process",
    op_retry_policy: RetryPolicy | None = None,
    pool: str | None = None,
) -> Callable[[Callable[[], Any]], JobDefinition]: ...


def job(
    fn: Callable[[], Any] | None = None,
    /,
    *,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    executor: str | dict[str, Any] = "in_process",
    op_retry_policy: RetryPolicy | None = None,
    pool: str | None = None,
) -> JobDefinition | Callable[[Callable[[], Any]], JobDefinition]:
    """Define a job; its body wires ops by calling them. Bare or called. `pool`: the
    concurrency pool of its ops that name none."""
    if fn is not None:
        return JobDefinition(fn, name, tags, executor, op_retry_policy, pool)

    def decorate(f: Callable[[], Any]) -> JobDefinition:
        return JobDefinition(f, name, tags, executor, op_retry_policy, pool)

    return decorate


@dataclass
class RunRequest:
    """Returned by a schedule or sensor to launch a run; `run_key` deduplicates launches."""

    run_key: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)
    job_name: str | None = None


@dataclass
class SkipReason:
    """Returned by a schedule or sensor to record why it launched nothing this tick."""

    skip_message: str = ""


@dataclass
class ScheduleEvaluationContext:
    """What a schedule function receives: the tick's time, aware, in the schedule's zone."""

    scheduled_time: datetime


class SensorEvaluationContext:
    """What a sensor function receives; `update_cursor` keeps state for the next tick
    (kept only if this tick succeeds or skips)."""

    def __init__(self, cursor: str | None = None, last_run_key: str | None = None) -> None:
        self.cursor = cursor
        self.last_run_key = last_run_key

    def update_cursor(self, cursor: str | None) -> None:
        if cursor is not None and not isinstance(cursor, str):
            raise TypeError(f"a sensor cursor is a string, got {type(cursor).__name__}")
        self.cursor = cursor


@dataclass(frozen=True)
class WatchedRun:
    """A run as a run status sensor sees it (Dagster's `context.dagster_run`)."""

    run_id: str
    job: str
    status: str
    tags: dict[str, str]
    status_reason: str | None = None
    failure_kind: str | None = None  # op_failure, worker_crash, agent_lost, ... (FAILURE)


@dataclass(frozen=True)
class StepFailure:
    """A step that failed in a watched run, and its error."""

    step: str
    error: str


class RunStatusSensorContext:
    """What a run status sensor's function receives, once per run that reached its
    status: the run, and for a failed run the steps that failed."""

    def __init__(self, run: WatchedRun, failure_steps: list[StepFailure] | None = None) -> None:
        self.run = run
        self.failure_steps = failure_steps or []


class DefaultScheduleStatus(StrEnum):
    """Whether a schedule ticks before anyone turns it on; off by default, as in Dagster."""

    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


class DefaultSensorStatus(StrEnum):
    """Whether a sensor is evaluated before anyone turns it on; off by default."""

    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


def _check_cron(schedule_name: str, cron: object) -> str:
    problem = cron_problem(cron)
    if problem is not None:
        raise DefinitionError(f"schedule {schedule_name}: cron {cron!r} {problem}")
    return cron  # type: ignore[return-value]


def _check_timezone(schedule_name: str, timezone: object) -> str:
    """Only IANA keys: a path-like key would make zoneinfo read arbitrary files."""
    problem = timezone_problem(timezone)
    if problem is not None:
        raise DefinitionError(f"schedule {schedule_name}: timezone {timezone!r} {problem}")
    return timezone  # type: ignore[return-value]


def _check_job_target(kind: str, name: str, target: object) -> JobDefinition:
    if not isinstance(target, JobDefinition):
        raise DefinitionError(f"{kind} {name}: job must be a @job, got {target!r}")
    return target


class ScheduleDefinition:
    """Launches runs of `job` on a cron schedule in `timezone`."""

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
        _check_callable("schedule", fn)
        self.name = _default_name("schedule", name, fn)
        self.fn = fn
        self.job = _check_job_target("schedule", self.name, job)
        self.cron = _check_cron(self.name, cron)
        self.timezone = _check_timezone(self.name, timezone)
        try:
            self.default_status = DefaultScheduleStatus(default_status)
        except ValueError:
            raise DefinitionError(
                f"schedule {self.name}: default_status must be RUNNING or STOPPED, "
                f"got {default_status!r}"
            ) from None
        self.tags = _check_tags("schedule", self.name, tags)
        if not isinstance(catchup, int) or isinstance(catchup, bool) or catchup < 0:
            raise DefinitionError(f"schedule {self.name}: catchup must be an int >= 0")
        self.catchup = catchup

    def __repr__(self) -> str:
        return f"<schedule {self.name} {self.cron!r} {self.timezone}>"


class SensorDefinition:
    """Polls `fn` at most every `minimum_interval_seconds` to decide whether to launch runs."""

    def __init__(
        self,
        fn: Callable[..., Any],
        job: JobDefinition | None,
        minimum_interval_seconds: float = 30,
        name: str | None = None,
        default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
    ) -> None:
        _check_callable("sensor", fn)
        self.name = _default_name("sensor", name, fn)
        self.fn = fn
        # None only for a run status sensor that requests no job of its own
        optional = job is None and isinstance(self, RunStatusSensorDefinition)
        self.job = None if optional else _check_job_target("sensor", self.name, job)
        interval = minimum_interval_seconds
        if not _is_number(interval) or not math.isfinite(interval) or interval <= 0:
            raise DefinitionError(
                f"sensor {self.name}: minimum_interval_seconds must be a number > 0, "
                f"got {interval!r}"
            )
        self.minimum_interval_seconds = interval
        try:
            self.default_status = DefaultSensorStatus(default_status)
        except ValueError:
            raise DefinitionError(
                f"sensor {self.name}: default_status must be RUNNING or STOPPED, "
                f"got {default_status!r}"
            ) from None

    def __repr__(self) -> str:
        return f"<sensor {self.name} every {self.minimum_interval_seconds}s>"


class RunStatusSensorDefinition(SensorDefinition):
    """A sensor evaluated once for each run of its monitored jobs that reached
    `run_status` since its last tick (Dagster's run status sensor). It may return run
    requests (of `request_job`, or the job a request names) or only act."""

    def __init__(
        self,
        fn: Callable[..., Any],
        run_status: str,
        monitored_jobs: Iterable[JobDefinition | str] | None = None,
        request_job: JobDefinition | None = None,
        minimum_interval_seconds: float = 30,
        name: str | None = None,
        default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
        monitor_all_code_locations: bool = False,
    ) -> None:
        name = _default_name("run status sensor", name, fn)
        super().__init__(fn, request_job, minimum_interval_seconds, name, default_status)
        if run_status not in SENSOR_RUN_STATUSES:
            raise DefinitionError(
                f"sensor {name}: run_status must be one of {', '.join(SENSOR_RUN_STATUSES)}, "
                f"got {run_status!r}"
            )
        self.run_status = str(run_status)
        self.monitored_jobs = [_monitored_job(name, j) for j in monitored_jobs or []]
        if not isinstance(monitor_all_code_locations, bool):
            raise DefinitionError(f"sensor {name}: monitor_all_code_locations must be a bool")
        self.monitor_all_code_locations = monitor_all_code_locations

    def __repr__(self) -> str:
        return f"<run status sensor {self.name} on {self.run_status}>"


def _monitored_job(sensor_name: str, job: object) -> str:
    if isinstance(job, JobDefinition):
        return job.name
    if isinstance(job, str):
        return _check_name("monitored job", job)
    raise DefinitionError(
        f"sensor {sensor_name}: monitored_jobs holds jobs or job names, got {job!r}"
    )


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
    """Define a schedule; the function returns RunRequest(s) or a SkipReason per tick."""

    def decorate(fn: Callable[..., Any]) -> ScheduleDefinition:
        return ScheduleDefinition(fn, job, cron, timezone, name, default_status, tags, catchup)

    return decorate


def sensor(
    *,
    job: JobDefinition,
    minimum_interval_seconds: float = 30,
    name: str | None = None,
    default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
) -> Callable[[Callable[..., Any]], SensorDefinition]:
    """Define a sensor; the function returns RunRequest(s) or a SkipReason per evaluation."""

    def decorate(fn: Callable[..., Any]) -> SensorDefinition:
        return SensorDefinition(fn, job, minimum_interval_seconds, name, default_status)

    return decorate


def run_status_sensor(
    *,
    run_status: str,
    monitored_jobs: Iterable[JobDefinition | str] | None = None,
    request_job: JobDefinition | None = None,
    minimum_interval_seconds: float = 30,
    name: str | None = None,
    default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
    monitor_all_code_locations: bool = False,
) -> Callable[[Callable[..., Any]], RunStatusSensorDefinition]:
    """Define a run status sensor: the function is called with a RunStatusSensorContext
    for each run of `monitored_jobs` (default: every job of this code location; with
    `monitor_all_code_locations`, of every location) that reached `run_status`, from
    the moment the sensor is first evaluated (no replay of history)."""

    def decorate(fn: Callable[..., Any]) -> RunStatusSensorDefinition:
        return RunStatusSensorDefinition(
            fn,
            run_status,
            monitored_jobs,
            request_job,
            minimum_interval_seconds,
            name,
            default_status,
            monitor_all_code_locations,
        )

    return decorate


def run_failure_sensor(
    *,
    monitored_jobs: Iterable[JobDefinition | str] | None = None,
    request_job: JobDefinition | None = None,
    minimum_interval_seconds: float = 30,
    name: str | None = None,
    default_status: DefaultSensorStatus = DefaultSensorStatus.STOPPED,
    monitor_all_code_locations: bool = False,
) -> Callable[[Callable[..., Any]], RunStatusSensorDefinition]:
    """A run status sensor on FAILURE; `context.failure_steps` has the failed steps."""
    return run_status_sensor(
        run_status="FAILURE",
        monitored_jobs=monitored_jobs,
        request_job=request_job,
        minimum_interval_seconds=minimum_interval_seconds,
        name=name,
        default_status=default_status,
        monitor_all_code_locations=monitor_all_code_locations,
    )


class Definitions:
    """Everything one code location defines; the agent finds it by type in the module."""

    def __init__(
        self,
        jobs: Iterable[JobDefinition] | None = None,
        schedules: Iterable[ScheduleDefinition] | None = None,
        sensors: Iterable[SensorDefinition] | None = None,
    ) -> None:
        self.jobs: dict[str, JobDefinition] = {}
        self.schedules: dict[str, ScheduleDefinition] = {}
        self.sensors: dict[str, SensorDefinition] = {}
        for j in jobs or []:
            if not isinstance(j, JobDefinition):
                raise DefinitionError(f"Definitions: {j!r} in jobs is not a @job")
            if j.name in self.jobs:
                raise DefinitionError(f"Definitions: two jobs are named {j.name!r}")
            self.jobs[j.name] = j
        for s in schedules or []:
            if not isinstance(s, ScheduleDefinition):
                raise DefinitionError(f"Definitions: {s!r} in schedules is not a @schedule")
            if s.name in self.schedules:
                raise DefinitionError(f"Definitions: two schedules are named {s.name!r}")
            self.schedules[s.name] = s
            self._add_target("schedule", s.name, s.job)
        for sensor in sensors or []:
            if not isinstance(sensor, SensorDefinition):
                raise DefinitionError(f"Definitions: {sensor!r} in sensors is not a @sensor")
            if sensor.name in self.sensors:
                raise DefinitionError(f"Definitions: two sensors are named {sensor.name!r}")
            if sensor.name in self.schedules:
                raise DefinitionError(
                    f"Definitions: sensor {sensor.name!r} has the same name as a schedule"
                )
            self.sensors[sensor.name] = sensor
            if sensor.job is not None:
                self._add_target("sensor", sensor.name, sensor.job)

    def _add_target(self, kind: str, name: str, target: JobDefinition) -> None:
        """Jobs only reachable through a schedule or sensor still need to be runnable."""
        known = self.jobs.setdefault(target.name, target)
        if known is not target:
            raise DefinitionError(
                f"Definitions: {kind} {name} targets a different job also named {target.name!r}"
            )

    def get_job(self, name: str) -> JobDefinition:
        """The job called `name`; KeyError names what is available."""
        try:
            return self.jobs[name]
        except KeyError:
            available = ", ".join(sorted(self.jobs)) or "none"
            raise KeyError(
                f"no job named {name!r} in this code location (available: {available})"
            ) from None

    def __repr__(self) -> str:
        return (
            f"<Definitions jobs={list(self.jobs)} schedules={list(self.schedules)} "
            f"sensors={list(self.sensors)}>"
        )
