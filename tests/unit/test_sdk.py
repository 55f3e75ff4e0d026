"""The job SDK: graph building, validation of definitions, retry-delay arithmetic."""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from typing import Any

import pytest

from agent.sdk import (
    Backoff,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    DefinitionError,
    Definitions,
    Failure,
    Jitter,
    JobDefinition,
    OpContext,
    OpDefinition,
    OpInvocation,
    OpOutput,
    RetryPolicy,
    RetryRequested,
    RunRequest,
    ScheduleDefinition,
    SensorDefinition,
    SkipReason,
    build_op_context,
    job,
    op,
    schedule,
    sensor,
)
from protocol.messages import JobInfo, OpInfo, RetryPolicyInfo


@op
def extract(context):
    return [1, 2]


@op(name="double_it", tags={"kind": "cpu"}, retry_policy=RetryPolicy(max_retries=2))
def double(context, rows):
    return [r * 2 for r in rows]


@op()
def add(context, a, b):
    return a + b


@op
def no_context():
    return 1


@op
def pure(rows):
    return len(rows)


@job
def target():
    extract()


def _job(body: Callable[[], Any], **options: Any) -> JobDefinition:
    return job(name="j", **options)(body)


def _schedule(**options: Any) -> ScheduleDefinition:
    options = {"job": target, "cron": "0 * * * *", "name": "s", **options}
    return schedule(**options)(lambda context: None)


# --- decorators, names, tags -------------------------------------------------------------


def test_bare_and_called_decorators_produce_op_definitions() -> None:
    assert all(isinstance(o, OpDefinition) for o in (extract, double, add, no_context))
    assert (extract.name, extract.takes_context, extract.input_names) == ("extract", True, [])
    assert (extract.tags, extract.retry_policy) == ({}, None)
    assert (double.name, double.tags) == ("double_it", {"kind": "cpu"})
    assert double.input_names == ["rows"]
    assert double.retry_policy == RetryPolicy(max_retries=2)
    assert (add.name, add.input_names) == ("add", ["a", "b"])
    assert (no_context.takes_context, no_context.input_names) == (False, [])
    assert (pure.takes_context, pure.input_names) == (False, ["rows"])


def test_job_decorator_bare_and_called() -> None:
    @job
    def bare():
        """Loads the things."""
        extract()

    @job()
    def empty_call():
        extract()

    @job(name="renamed", tags={"team": "data"}, executor="multiprocess")
    def original():
        extract()

    assert isinstance(bare, JobDefinition)
    assert (bare.name, bare.tags, bare.executor) == ("bare", {}, {"name": "in_process"})
    assert (bare.description, empty_call.description) == ("Loads the things.", None)
    assert empty_call.name == "empty_call" and empty_call.op_retry_policy is None
    assert (original.name, original.tags) == ("renamed", {"team": "data"})
    assert original.executor == {"name": "multiprocess"}


def test_names_up_to_128_characters_are_accepted() -> None:
    long_name = "a" * 128
    assert op(name=long_name)(lambda context: 1).name == long_name
    assert op(name="Mixed_Case_09")(lambda: 1).name == "Mixed_Case_09"


# --- graph wiring ------------------------------------------------------------------------


def test_chain_wiring_in_call_order() -> None:
    @job
    def chain():
        add_one = op(name="total")(lambda context, rows: sum(rows))
        add_one(double(extract()))

    assert list(chain.nodes) == ["extract", "double_it", "total"]
    assert [n.upstream for n in chain.nodes.values()] == [[], ["extract"], ["double_it"]]
    assert chain.nodes["double_it"].op is double
    assert chain.nodes["total"].name == "total"


def test_diamond_fan_out_fan_in_and_aliasing() -> None:
    @job(tags={"team": "x"}, executor={"name": "multiprocess", "max_concurrent": 2})
    def diamond():
        rows = extract()
        add(double(rows), double(rows))

    assert diamond.executor == {"name": "multiprocess", "max_concurrent": 2}
    assert [(n.name, n.upstream) for n in diamond.nodes.values()] == [
        ("extract", []),
        ("double_it", ["extract"]),
        ("double_it_2", ["extract"]),
        ("add", ["double_it", "double_it_2"]),
    ]
    assert diamond.nodes["double_it_2"].op is double


def test_op_taking_the_same_upstream_twice() -> None:
    @job
    def twice():
        rows = extract()
        add(rows, rows)

    assert twice.nodes["add"].upstream == ["extract", "extract"]
    assert twice.to_info().ops[1] == OpInfo(name="add", upstream=["extract"], tags={})


def test_aliasing_counts_up_per_op() -> None:
    @job
    def thrice():
        extract()
        extract()
        extract()

    assert list(thrice.nodes) == ["extract", "extract_2", "extract_3"]
    assert all(n.op is extract and n.upstream == [] for n in thrice.nodes.values())


def test_aliasing_skips_names_taken_by_another_op() -> None:
    clash = op(name="extract_2")(lambda context: 0)

    @job
    def clashing():
        extract()
        clash()
        extract()
        clash()

    assert list(clashing.nodes) == ["extract", "extract_2", "extract_3", "extract_2_2"]
    assert clashing.nodes["extract_2"].op is clash
    assert clashing.nodes["extract_3"].op is extract


def test_op_call_returns_a_handle_inside_a_job() -> None:
    seen: list[Any] = []

    @job
    def handles():
        seen.append(extract())
        seen.append(double(seen[0]))

    assert seen == [OpOutput("extract"), OpOutput("double_it")]


def test_to_info() -> None:
    @job(tags={"team": "data"}, executor={"name": "multiprocess", "max_concurrent": 4})
    def info_job():
        rows = extract()
        add(double(rows), rows)

    info = info_job.to_info()
    assert info == JobInfo(
        name="info_job",
        ops=[
            OpInfo(name="extract", upstream=[], tags={}),
            OpInfo(
                name="double_it",
                upstream=["extract"],
                tags={"kind": "cpu"},
                retry_policy=RetryPolicyInfo(max_retries=2),
            ),
            OpInfo(name="add", upstream=["double_it", "extract"], tags={}),
        ],
        tags={"team": "data"},
        executor="multiprocess",
    )
    info.tags["mutated"] = "yes"
    info.ops[1].tags["mutated"] = "yes"
    assert info_job.tags == {"team": "data"} and double.tags == {"kind": "cpu"}


# --- direct invocation and context -------------------------------------------------------


def test_direct_invocation_outside_a_job_calls_the_function() -> None:
    assert extract(build_op_context()) == [1, 2]
    assert double(build_op_context(), [1, 3]) == [2, 6]
    assert add(None, 2, b=5) == 7
    assert no_context() == 1
    assert pure([1, 2, 3]) == 3


def test_build_op_context_defaults_and_overrides() -> None:
    context = build_op_context()
    assert isinstance(context, OpContext)
    assert (context.run_id, context.retry_number, context.tags, context.run_config) == (
        "test-run",
        0,
        {},
        {},
    )
    assert context.log is logging.getLogger("fleetrun.test")
    custom = build_op_context(run_id="r1", run_config={"out": "x"}, retry_number=2, step="s")
    assert (custom.run_id, custom.run_config, custom.retry_number, custom.step) == (
        "r1",
        {"out": "x"},
        2,
        "s",
    )


def test_op_context_exposes_its_constructor_arguments() -> None:
    log = logging.getLogger("fleetrun.unit")
    context = OpContext("r", "j", {"a": "b"}, {"k": 1}, "step_2", 3, log)
    assert (context.run_id, context.job_name, context.tags, context.run_config) == (
        "r",
        "j",
        {"a": "b"},
        {"k": 1},
    )
    assert (context.step, context.retry_number, context.log) == ("step_2", 3, log)


def test_user_raised_exceptions_keep_their_fields() -> None:
    retry = RetryRequested(max_retries=3, seconds_to_wait=1.5)
    assert (retry.max_retries, retry.seconds_to_wait) == (3, 1.5)
    failure = Failure("disk full", metadata={"free": 0}, allow_retries=False)
    assert (str(failure), failure.description, failure.metadata) == (
        "disk full",
        "disk full",
        {"free": 0},
    )
    assert failure.allow_retries is False
    assert Failure().metadata == {} and Failure().allow_retries is True


# --- retry policies ----------------------------------------------------------------------


def test_op_policy_wins_over_the_job_default() -> None:
    default = RetryPolicy(max_retries=5, delay=1)

    @job(op_retry_policy=default)
    def policies():
        double(extract())

    @job
    def no_policy():
        extract()

    assert policies.retry_policy_for("extract") is default
    assert policies.retry_policy_for("double_it") is double.retry_policy
    assert no_policy.retry_policy_for("extract") is None
    with pytest.raises(KeyError, match="no step named 'nope'"):
        policies.retry_policy_for("nope")


INVOCATION_POLICY = RetryPolicy(max_retries=3)
OP_POLICY = RetryPolicy(max_retries=2)
JOB_POLICY = RetryPolicy(max_retries=1)


@pytest.mark.parametrize("on_invocation", [True, False])
@pytest.mark.parametrize("on_op", [True, False])
@pytest.mark.parametrize("on_job", [True, False])
def test_retry_policy_precedence_is_invocation_then_op_then_job(
    on_invocation: bool, on_op: bool, on_job: bool
) -> None:
    step = op(name="step", retry_policy=OP_POLICY if on_op else None)(lambda context: 1)
    invoke = step.with_retry_policy(INVOCATION_POLICY) if on_invocation else step

    defined = _job(lambda: invoke(), op_retry_policy=JOB_POLICY if on_job else None)

    expected = next(
        (
            policy
            for is_set, policy in [
                (on_invocation, INVOCATION_POLICY),
                (on_op, OP_POLICY),
                (on_job, JOB_POLICY),
            ]
            if is_set
        ),
        None,
    )
    assert defined.retry_policy_for("step") is expected


def test_an_invocation_policy_applies_to_that_invocation_only() -> None:
    @job(op_retry_policy=JOB_POLICY)
    def two_calls():
        double.alias("retried").with_retry_policy(INVOCATION_POLICY)(extract())
        double(extract())

    assert two_calls.retry_policy_for("retried") is INVOCATION_POLICY
    assert two_calls.retry_policy_for("double_it") is double.retry_policy
    assert two_calls.retry_policy_for("extract") is JOB_POLICY
    assert two_calls.nodes["retried"].retry_policy is INVOCATION_POLICY
    assert two_calls.nodes["double_it"].retry_policy is None


# --- invocations: alias, with_retry_policy, tag ------------------------------------------


def test_an_alias_names_the_step_and_plain_calls_keep_their_numbering() -> None:
    @job
    def aliased():
        rows = extract.alias("load_eu")()
        double.alias("double_eu")(rows)
        extract()
        extract()

    assert [(n.name, n.upstream) for n in aliased.nodes.values()] == [
        ("load_eu", []),
        ("double_eu", ["load_eu"]),
        ("extract", []),
        ("extract_2", []),
    ]
    assert aliased.nodes["load_eu"].op is extract
    assert aliased.nodes["double_eu"].op is double
    assert [o.name for o in aliased.to_info().ops] == [
        "load_eu",
        "double_eu",
        "extract",
        "extract_2",
    ]


def test_a_plain_call_skips_a_name_an_alias_took() -> None:
    @job
    def taken():
        extract.alias("extract")()
        extract()

    assert list(taken.nodes) == ["extract", "extract_2"]


def test_alias_and_retry_policy_chain_in_either_order() -> None:
    first = extract.alias("x").with_retry_policy(INVOCATION_POLICY)
    second = extract.with_retry_policy(INVOCATION_POLICY).alias("x")

    assert first == second == OpInvocation(extract, "x", INVOCATION_POLICY)
    assert extract.alias("x").alias("y").given_alias == "y"

    @job
    def chained():
        first()
        second.alias("y")()
        extract.with_retry_policy(INVOCATION_POLICY)()  # no alias: the op's own name

    assert list(chained.nodes) == ["x", "y", "extract"]
    assert all(n.retry_policy is INVOCATION_POLICY for n in chained.nodes.values())


def test_an_invocation_is_a_frozen_value() -> None:
    plain = OpInvocation(extract)
    aliased = plain.alias("x")
    tags = {"a": "1"}
    tagged = plain.tag(tags)
    tags["a"] = "changed"

    assert plain == OpInvocation(extract, None, None, {})
    assert aliased.given_alias == "x" and plain.given_alias is None
    assert tagged.tags == {"a": "1"}
    assert hash(aliased) == hash(OpInvocation(extract, "x"))
    with pytest.raises(FrozenInstanceError):
        aliased.given_alias = "y"  # type: ignore[misc]


def test_an_invocation_outside_a_job_calls_the_function() -> None:
    assert extract.alias("x")(build_op_context()) == [1, 2]
    assert double.with_retry_policy(INVOCATION_POLICY)(None, [2]) == [4]
    assert pure.tag({"a": "b"})([1, 2]) == 2


def test_invocation_tags_override_the_op_tags_for_that_step_only() -> None:
    @job
    def tagged():
        rows = extract()
        double.tag({"kind": "gpu", "fleetrun/priority": "5"}).tag({"extra": "1"})(rows)
        double(rows)

    assert tagged.nodes["double_it"].tags == {
        "kind": "gpu",
        "fleetrun/priority": "5",
        "extra": "1",
    }
    assert tagged.nodes["double_it_2"].tags == {"kind": "cpu"}
    assert [o.tags for o in tagged.to_info().ops] == [
        {},
        {"kind": "gpu", "fleetrun/priority": "5", "extra": "1"},
        {"kind": "cpu"},
    ]
    assert double.tags == {"kind": "cpu"}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: extract.alias("bad name"), r"op extract: alias name 'bad name' is invalid"),
        (lambda: extract.alias(""), r"op extract: alias name '' is invalid"),
        (lambda: extract.alias("a" * 129), "at most 128"),
        (lambda: extract.alias(3), r"alias name 3 is invalid"),  # type: ignore[arg-type]
        (lambda: extract.alias("x").alias("no-dash"), r"alias name 'no-dash' is invalid"),
        (
            lambda: extract.with_retry_policy(3),  # type: ignore[arg-type]
            r"op extract: with_retry_policy takes a RetryPolicy, got 3",
        ),
        (
            lambda: extract.alias("x").with_retry_policy(None),  # type: ignore[arg-type]
            "with_retry_policy takes a RetryPolicy, got None",
        ),
        (
            lambda: OpInvocation(extract, retry_policy={"max_retries": 1}),  # type: ignore[arg-type]
            "with_retry_policy takes a RetryPolicy",
        ),
        (lambda: extract.tag(["a"]), "op extract: tags must be a dict"),  # type: ignore[arg-type]
        (lambda: extract.tag({"a": 1}), "op extract: tag keys and values"),  # type: ignore[dict-item]
        (lambda: OpInvocation(len), "op must be an @op"),  # type: ignore[arg-type]
    ],
)
def test_invalid_invocations(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        make()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            lambda: (extract.alias("x")(), pure.alias("x")(extract())),
            r"job j: op pure \(as x\): the job already has a step named 'x'",
        ),
        (
            lambda: (extract(), extract.alias("extract")()),
            "already has a step named 'extract'; give each invocation its own alias",
        ),
        (
            lambda: double.alias("d")(),
            r"job j: op double_it \(as d\) takes 1 input \(rows\), got 0",
        ),
    ],
)
def test_invalid_aliased_job_bodies(body: Callable[[], Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        _job(body)


@pytest.mark.parametrize(
    ("policy", "delays"),
    [
        (RetryPolicy(max_retries=3), [0.0, 0.0, 0.0]),
        (RetryPolicy(delay=2), [2.0, 2.0, 2.0]),
        (RetryPolicy(delay=2, backoff=Backoff.LINEAR), [2.0, 4.0, 6.0]),
        (RetryPolicy(delay=1, backoff=Backoff.EXPONENTIAL), [1.0, 3.0, 7.0]),
        (RetryPolicy(delay=0.5, backoff=Backoff.EXPONENTIAL), [0.5, 1.5, 3.5]),
    ],
)
def test_retry_delays_without_jitter(policy: RetryPolicy, delays: list[float]) -> None:
    assert [policy.calculate_delay(n) for n in (1, 2, 3)] == pytest.approx(delays)


@pytest.mark.parametrize(
    ("backoff", "base"),
    [(None, 2.0), (Backoff.LINEAR, 6.0), (Backoff.EXPONENTIAL, 14.0)],
)
def test_full_jitter_scales_the_base_delay(backoff: Backoff | None, base: float) -> None:
    policy = RetryPolicy(delay=2, backoff=backoff, jitter=Jitter.FULL)
    draw = random.Random(42).random()
    assert policy.calculate_delay(3, random.Random(42)) == pytest.approx(draw * base)
    assert 0.0 <= policy.calculate_delay(3, random.Random(7)) <= base


@pytest.mark.parametrize(
    ("backoff", "base"),
    [(None, 2.0), (Backoff.LINEAR, 6.0), (Backoff.EXPONENTIAL, 14.0)],
)
def test_plus_minus_jitter_adds_up_to_one_delay(backoff: Backoff | None, base: float) -> None:
    policy = RetryPolicy(delay=2, backoff=backoff, jitter=Jitter.PLUS_MINUS)
    offset = random.Random(42).uniform(-2.0, 2.0)
    assert policy.calculate_delay(3, random.Random(42)) == pytest.approx(base + offset)
    values = [policy.calculate_delay(3, random.Random(seed)) for seed in range(100)]
    assert all(base - 2.0 <= v <= base + 2.0 for v in values)
    assert len(set(values)) > 50


def test_plus_minus_jitter_never_goes_negative() -> None:
    policy = RetryPolicy(delay=1, jitter=Jitter.PLUS_MINUS)
    values = [policy.calculate_delay(1, random.Random(seed)) for seed in range(200)]
    assert 0.0 <= min(values) < 1.0 < max(values) <= 2.0


def test_calculate_delay_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="starts at 1"):
        RetryPolicy(delay=1).calculate_delay(0)


# --- invalid definitions -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: op(name="bad name")(lambda context: 1), r"op name 'bad name' is invalid"),
        (lambda: op(name="trailing\n")(lambda context: 1), "op name"),
        (lambda: op(name="")(lambda context: 1), "op name '' is invalid"),
        (lambda: op(name="a" * 129)(lambda context: 1), "at most 128"),
        (lambda: op(lambda context: 1), r"op name '<lambda>' is invalid"),
        (lambda: job(name="bad-job")(lambda: extract()), "job name 'bad-job'"),
        (lambda: _schedule(name="bad.schedule"), "schedule name 'bad.schedule'"),
        (
            lambda: sensor(job=target, name="bad sensor")(lambda context: None),
            "sensor name 'bad sensor'",
        ),
        (lambda: op(name="o")(lambda *args: 1), r"op o: parameter 'args'"),
        (lambda: op(name="o")(lambda context, **kw: 1), r"op o: parameter 'kw'"),
        (lambda: op(name="o")(lambda context, *, x: 1), r"op o: parameter 'x'"),
        (
            lambda: op(name="o", tags={"a": 1})(lambda context: 1),  # type: ignore[dict-item]
            "op o: tag keys and values",
        ),
        (
            lambda: op(name="o", tags={1: "a"})(lambda context: 1),  # type: ignore[dict-item]
            "op o: tag keys and values",
        ),
        (
            lambda: op(name="o", tags=["a"])(lambda context: 1),  # type: ignore[call-overload]
            "op o: tags must be a dict",
        ),
        (
            lambda: op(name="o", retry_policy=3)(lambda context: 1),  # type: ignore[call-overload]
            "op o: retry_policy",
        ),
        (
            lambda: job(name="j", tags={"a": 2})(lambda: extract()),  # type: ignore[dict-item]
            "job j: tag keys",
        ),
        (lambda: op("extract"), "must decorate a function"),  # type: ignore[call-overload]
    ],
)
def test_invalid_op_and_name_definitions(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        make()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (lambda: add(extract()), r"job j: op add takes 2 inputs \(a, b\), got 1"),
        (lambda: double(extract(), extract()), r"op double_it takes 1 input \(rows\), got 2"),
        (lambda: extract(extract()), r"op extract takes 0 inputs \(none\), got 1"),
        (lambda: double(5), r"job j: op double_it: argument 1 must be the result of .* got int"),
        (lambda: add(extract(), [1]), r"op add: argument 2 must be .* got list"),
        (lambda: double(rows=extract()), "op double_it takes upstream outputs as positional"),
        (lambda: double(OpOutput("extract")), "op double_it: argument 1 is the output of step"),
        (lambda: None, "job j: the body calls no op"),
        (lambda: 1 / 0, "job j: body raised ZeroDivisionError: division by zero"),
    ],
)
def test_invalid_job_bodies(body: Callable[[], Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        _job(body)


def test_raising_body_keeps_the_original_exception_as_cause() -> None:
    def body() -> None:
        raise RuntimeError("boom")

    with pytest.raises(DefinitionError, match="body raised RuntimeError: boom") as info:
        _job(body)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_handle_from_another_job_is_rejected() -> None:
    leaked: list[OpOutput] = []
    _job(lambda: leaked.append(extract()))
    with pytest.raises(DefinitionError, match="step 'extract', which was not called"):
        _job(lambda: double(leaked[0]))


def test_job_body_with_parameters_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="job j: the body must take no arguments"):
        _job(lambda rows: double(rows))  # type: ignore[arg-type, misc]


def test_async_and_generator_functions_are_rejected() -> None:
    async def coro(context):
        return 1

    def gen(context):
        yield 1

    with pytest.raises(DefinitionError, match="op coro: async"):
        op(coro)
    with pytest.raises(DefinitionError, match="op gen: generator"):
        op(gen)


def test_tracing_is_inactive_after_a_failed_job() -> None:
    with pytest.raises(DefinitionError):
        _job(lambda: 1 / 0)
    assert double(build_op_context(), [2]) == [4]


@pytest.mark.parametrize(
    ("executor", "message"),
    [
        (5, "job j: executor must be a name or a dict"),
        ({"max_concurrent": 4}, "executor must be a name or a dict with a string 'name'"),
        ({"name": 3}, "with a string 'name'"),
        ("", "executor name '' is invalid"),
        ({"name": "multiprocess", "max_concurrent": 0}, "max_concurrent must be a positive"),
        ({"name": "multiprocess", "max_concurrent": "4"}, "max_concurrent must be a positive"),
    ],
)
def test_bad_executor(executor: Any, message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        _job(lambda: extract(), executor=executor)


def test_executor_dict_is_copied() -> None:
    config = {"name": "multiprocess", "max_concurrent": 4}
    defined = _job(lambda: extract(), executor=config)
    config["max_concurrent"] = 99
    assert defined.executor == {"name": "multiprocess", "max_concurrent": 4}


def test_bad_job_op_retry_policy() -> None:
    with pytest.raises(DefinitionError, match="job j: op_retry_policy must be a RetryPolicy"):
        _job(lambda: extract(), op_retry_policy={"max_retries": 2})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RetryPolicy(backoff=Backoff.LINEAR), "backoff and jitter need a delay"),
        (lambda: RetryPolicy(jitter=Jitter.FULL), "backoff and jitter need a delay"),
        (lambda: RetryPolicy(max_retries=-1), "max_retries must be >= 0"),
        (
            lambda: RetryPolicy(max_retries=1.5),  # type: ignore[arg-type]
            "max_retries must be an int",
        ),
        (lambda: RetryPolicy(max_retries=True), "max_retries must be an int"),
        (lambda: RetryPolicy(delay=-0.1), "delay must be a finite number >= 0"),
        (lambda: RetryPolicy(delay=float("nan")), "delay must be a finite number"),
        (lambda: RetryPolicy(delay="1"), "delay must be a finite number"),  # type: ignore[arg-type]
        (
            lambda: RetryPolicy(delay=1, backoff="LINEAR"),  # type: ignore[arg-type]
            "backoff must be a Backoff",
        ),
        (
            lambda: RetryPolicy(delay=1, jitter="FULL"),  # type: ignore[arg-type]
            "jitter must be a Jitter",
        ),
    ],
)
def test_invalid_retry_policies(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        make()


# --- schedules and sensors ---------------------------------------------------------------


def test_schedule_definition_stores_its_settings() -> None:
    @schedule(job=target, cron="*/5 * * * *", timezone="Europe/Berlin")
    def every_five(context):
        return RunRequest(tags={"source": "cron"})

    assert isinstance(every_five, ScheduleDefinition)
    assert (every_five.name, every_five.job, every_five.cron) == (
        "every_five",
        target,
        "*/5 * * * *",
    )
    assert (every_five.timezone, every_five.tags, every_five.catchup) == ("Europe/Berlin", {}, 0)
    assert every_five.default_status is DefaultScheduleStatus.STOPPED
    assert every_five.fn(None) == RunRequest(tags={"source": "cron"})
    custom = _schedule(
        name="nightly",
        cron="0 3 * * mon-fri",
        default_status="RUNNING",
        tags={"k": "v"},
        catchup=2,
    )
    assert (custom.name, custom.timezone, custom.tags, custom.catchup) == (
        "nightly",
        "UTC",
        {"k": "v"},
        2,
    )
    assert custom.default_status is DefaultScheduleStatus.RUNNING


@pytest.mark.parametrize(
    "cron",
    [
        "60 * * * *",
        "*/0 * * * *",
        "0 0 1 13 *",
        "0 0 31 2 *",
        "0 0 * * 8",
        "@reboot",
        "@daily",
        "* * * * * *",
        "* * * *",
        "* * * *\n* * * * *",
        "",
    ],
)
def test_bad_cron_is_a_definition_error_naming_schedule_and_cron(cron: str) -> None:
    with pytest.raises(DefinitionError) as info:
        _schedule(cron=cron)
    assert str(info.value).startswith(f"schedule s: cron {cron!r}")


@pytest.mark.parametrize("cron", ["0 0 29 2 *", "0 0 L * *", "0 9 * * 1-5", "0 0 * jan sun"])
def test_unusual_but_valid_crons_are_accepted(cron: str) -> None:
    assert _schedule(cron=cron).cron == cron


@pytest.mark.parametrize(
    "timezone",
    [
        "Mars/Olympus",
        "../../etc/passwd",
        "/etc/localtime",
        "Europe/../UTC",
        "UTC\x00",
        "Europe",
        "zone.tab",
        "",
        None,
    ],
)
def test_bad_timezone_is_a_definition_error_naming_it(timezone: Any) -> None:
    with pytest.raises(DefinitionError, match=re.escape(f"schedule s: timezone {timezone!r}")):
        _schedule(timezone=timezone)


@pytest.mark.parametrize("timezone", ["UTC", "America/Argentina/Buenos_Aires", "Etc/GMT+5"])
def test_iana_timezones_are_accepted(timezone: str) -> None:
    assert _schedule(timezone=timezone).timezone == timezone


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"job": extract}, "schedule s: job must be a @job"),
        ({"cron": 5}, "cron 5 must be a string"),
        ({"default_status": "PAUSED"}, "default_status must be RUNNING or STOPPED"),
        ({"catchup": -1}, "catchup must be an int >= 0"),
        ({"tags": {"k": 1}}, "schedule s: tag keys"),
    ],
)
def test_invalid_schedules(options: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        _schedule(**options)


def test_sensor_definition_stores_its_settings() -> None:
    @sensor(job=target, minimum_interval_seconds=10, default_status=DefaultSensorStatus.RUNNING)
    def files(context):
        return SkipReason("nothing new")

    assert isinstance(files, SensorDefinition)
    assert (files.name, files.job, files.minimum_interval_seconds) == ("files", target, 10)
    assert files.default_status is DefaultSensorStatus.RUNNING
    assert files.fn(None) == SkipReason(skip_message="nothing new")
    plain = sensor(job=target, name="plain")(lambda context: [RunRequest(run_key="k")])
    assert plain.minimum_interval_seconds == 30
    assert plain.default_status is DefaultSensorStatus.STOPPED


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"job": "target"}, "sensor x: job must be a @job"),
        ({"minimum_interval_seconds": 0}, "sensor x: minimum_interval_seconds must be"),
        ({"minimum_interval_seconds": -5}, "minimum_interval_seconds must be a number > 0"),
        ({"default_status": "ON"}, "sensor x: default_status must be RUNNING or STOPPED"),
    ],
)
def test_invalid_sensors(options: dict[str, Any], message: str) -> None:
    options = {"job": target, "name": "x", **options}
    with pytest.raises(DefinitionError, match=message):
        sensor(**options)(lambda context: None)


def test_run_request_and_skip_reason_defaults() -> None:
    request = RunRequest()
    assert (request.run_key, request.tags, request.run_config, request.job_name) == (
        None,
        {},
        {},
        None,
    )
    assert RunRequest().tags is not RunRequest().tags
    assert SkipReason().skip_message == ""


# --- Definitions -------------------------------------------------------------------------


def test_definitions_collects_jobs_schedules_and_sensors() -> None:
    @job
    def other():
        extract()

    every_five = _schedule(name="every_five")
    files = sensor(job=other, name="files")(lambda context: None)
    defs = Definitions(schedules=[every_five], sensors=[files])
    assert list(defs.jobs) == ["target", "other"]
    assert defs.get_job("target") is target and defs.get_job("other") is other
    assert defs.schedules == {"every_five": every_five}
    assert defs.sensors == {"files": files}
    explicit = Definitions(jobs=[target], schedules=[every_five])
    assert explicit.jobs == {"target": target}
    assert Definitions().jobs == {} and Definitions().schedules == {}


def test_get_job_missing_is_a_clear_key_error() -> None:
    with pytest.raises(KeyError, match=r"no job named 'nope' .*available: target"):
        Definitions(jobs=[target]).get_job("nope")


def test_definitions_rejects_duplicates_and_impostors() -> None:
    @job(name="target")
    def impostor():
        extract()

    first = _schedule(name="dup")
    second = _schedule(name="dup", cron="5 * * * *")
    watcher = sensor(job=target, name="watch")(lambda context: None)
    with pytest.raises(DefinitionError, match="two jobs are named 'target'"):
        Definitions(jobs=[target, target])
    with pytest.raises(DefinitionError, match="two jobs are named 'target'"):
        Definitions(jobs=[target, impostor])
    with pytest.raises(DefinitionError, match="two schedules are named 'dup'"):
        Definitions(schedules=[first, second])
    with pytest.raises(DefinitionError, match="two sensors are named 'watch'"):
        Definitions(sensors=[watcher, watcher])
    with pytest.raises(DefinitionError, match="schedule dup targets a different job"):
        Definitions(jobs=[impostor], schedules=[first])
    with pytest.raises(DefinitionError, match="sensor watch targets a different job"):
        Definitions(jobs=[impostor], sensors=[watcher])
    clash = sensor(job=target, name="dup")(lambda context: None)
    with pytest.raises(DefinitionError, match="sensor 'dup' has the same name as a schedule"):
        Definitions(schedules=[first], sensors=[clash])
    with pytest.raises(DefinitionError, match="in jobs is not a @job"):
        Definitions(jobs=[extract])  # type: ignore[list-item]
    with pytest.raises(DefinitionError, match="in schedules is not a @schedule"):
        Definitions(schedules=[watcher])  # type: ignore[list-item]


def test_run_status_sensors_describe_what_they_watch() -> None:
    from agent.sdk import RunStatusSensorDefinition, run_failure_sensor, run_status_sensor
    from agent.worker.code_location import _sensor_info

    @op
    def work() -> int:
        return 1

    @job
    def watched() -> None:
        work()

    @job
    def follow_up() -> None:
        work()

    @run_failure_sensor(monitored_jobs=[watched, "other"], request_job=follow_up)
    def on_failure(context: Any) -> None:
        return None

    @run_status_sensor(run_status="SUCCESS", monitor_all_code_locations=True)
    def on_success(context: Any) -> None:
        return None

    assert isinstance(on_failure, RunStatusSensorDefinition)
    info = _sensor_info(on_failure)
    assert (info.job, info.run_status, info.monitored_jobs) == (
        "follow_up",
        "FAILURE",
        ["watched", "other"],
    )
    quiet = _sensor_info(on_success)
    assert (quiet.job, quiet.run_status, quiet.monitor_all_locations) == ("", "SUCCESS", True)
    defs = Definitions(jobs=[watched], sensors=[on_failure, on_success])
    assert set(defs.jobs) == {"watched", "follow_up"}  # request_job is runnable


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"run_status": "DONE"}, "run_status must be one of QUEUED"),
        ({"run_status": "FAILURE", "monitored_jobs": [3]}, "monitored_jobs holds jobs"),
        ({"run_status": "FAILURE", "monitored_jobs": ["a-b"]}, "monitored job name 'a-b'"),
        ({"run_status": "FAILURE", "request_job": "etl"}, "job must be a @job"),
    ],
)
def test_invalid_run_status_sensors(options: dict[str, Any], message: str) -> None:
    from agent.sdk import run_status_sensor

    with pytest.raises(DefinitionError, match=re.escape(message)):
        run_status_sensor(name="s", **options)(lambda context: None)


def test_a_plain_sensor_still_needs_a_job() -> None:
    with pytest.raises(DefinitionError, match="job must be a @job"):
        sensor(job=None, name="s")(lambda context: None)  # type: ignore[arg-type]


def test_a_run_status_sensor_is_called_once_per_run(tmp_path: Any) -> None:
    """The worker calls the function for each run sent, gathers what they request."""
    from agent.worker.evaluation import evaluate
    from protocol.messages import (
        Evaluate,
        EvaluateSpec,
        FailedStep,
        LocationSpec,
        RunChange,
    )

    location = tmp_path / "watch.py"
    location.write_text(
        "from agent.sdk import Definitions, RunRequest, job, op, run_failure_sensor\n"
        "@op\ndef w():\n    return 1\n"
        "@job\ndef retry_it():\n    w()\n"
        "@run_failure_sensor(request_job=retry_it)\n"
        "def on_failure(context):\n"
        "    if context.run.tags.get('skip'):\n        return None\n"
        "    step = context.failure_steps[0]\n"
        "    return RunRequest(run_key=context.run.run_id, tags={'step': step.step,"
        " 'kind': context.run.failure_kind})\n"
        "defs = Definitions(sensors=[on_failure])\n"
    )
    changes = [
        RunChange("r1", "etl", "loc", "FAILURE", {}, "boom", "op_failure", [FailedStep("a", "E")]),
        RunChange("r2", "etl", "loc", "FAILURE", {"skip": "1"}, None, "worker_crash"),
    ]
    request = Evaluate("e", "loc", "sensor", "on_failure", cursor="7", run_changes=changes)
    result = evaluate(EvaluateSpec(request, LocationSpec("loc", python_file=str(location))))
    assert result.error is None, result.error
    (run,) = result.runs
    assert (run.job, run.run_key, run.tags) == (
        "retry_it",
        "r1",
        {"step": "a", "kind": "op_failure"},
    )
    assert result.cursor == "7"


def test_a_job_reports_each_steps_retry_policy_as_it_applies() -> None:
    from agent.sdk import Backoff, Jitter, RetryPolicy
    from protocol.messages import CodeLocationInfo, RetryPolicyInfo
    from protocol.validation import location_problem

    @op(retry_policy=RetryPolicy(max_retries=3))
    def fetch() -> int:
        return 1

    slow = RetryPolicy(max_retries=1, delay=2, backoff=Backoff.EXPONENTIAL, jitter=Jitter.FULL)

    @job(op_retry_policy=RetryPolicy(max_retries=5))
    def pipeline() -> None:
        fetch()
        fetch.alias("careful").with_retry_policy(slow)()

    info = pipeline.to_info()
    assert {o.name: o.retry_policy for o in info.ops} == {
        "fetch": RetryPolicyInfo(3),
        "careful": RetryPolicyInfo(1, 2.0, "EXPONENTIAL", "FULL"),
    }
    assert location_problem(CodeLocationInfo("loc", jobs=[info])) is None
    bad = dataclasses.replace(
        info, ops=[dataclasses.replace(info.ops[0], retry_policy=RetryPolicyInfo(-1))]
    )
    assert "retry_policy max_retries must be between" in (
        location_problem(CodeLocationInfo("loc", jobs=[bad])) or ""
    )
