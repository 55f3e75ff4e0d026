"""The job SDK: graph building, validation of definitions, retry-delay arithmetic."""

from __future__ import annotations

import random

import pytest

from agent.sdk import (
    Backoff,
    DefinitionError,
    Definitions,
    Jitter,
    RetryPolicy,
    RunRequest,
    SkipReason,
    build_op_context,
    job,
    op,
    schedule,
    sensor,
)


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


def test_bare_and_called_decorators() -> None:
    assert (extract.name, extract.takes_context, extract.input_names) == ("extract", True, [])
    assert (double.name, double.tags, double.input_names) == ("double_it", {"kind": "cpu"},
                                                              ["rows"])  # fmt: skip
    assert add.input_names == ["a", "b"]
    assert (no_context.takes_context, no_context.input_names) == (False, [])


def test_chain_and_diamond_wiring() -> None:
    @job(tags={"team": "x"}, executor={"name": "multiprocess", "max_concurrent": 2})
    def diamond():
        rows = extract()
        add(double(rows), double(rows))

    assert diamond.name == "diamond" and diamond.tags == {"team": "x"}
    assert diamond.executor == {"name": "multiprocess", "max_concurrent": 2}
    assert [(n.name, n.upstream) for n in diamond.nodes.values()] == [
        ("extract", []),
        ("double_it", ["extract"]),
        ("double_it_2", ["extract"]),
        ("add", ["double_it", "double_it_2"]),
    ]
    info = diamond.to_info()
    assert info.executor == "multiprocess"
    assert [(o.name, o.upstream, o.tags) for o in info.ops][1] == ("double_it", ["extract"],
                                                                  {"kind": "cpu"})  # fmt: skip


def test_same_upstream_twice_and_bare_job() -> None:
    @job
    def twice():
        rows = extract()
        add(rows, rows)

    assert twice.nodes["add"].upstream == ["extract", "extract"]
    assert twice.to_info().ops[1].upstream == ["extract"]
    assert twice.executor == {"name": "in_process"}


def test_op_retry_policy_wins_over_the_job_default() -> None:
    default = RetryPolicy(max_retries=5, delay=1)

    @job(op_retry_policy=default)
    def policies():
        double(extract())

    assert policies.retry_policy_for("extract") is default
    assert policies.retry_policy_for("double_it") == RetryPolicy(max_retries=2)


def test_direct_invocation_outside_a_job() -> None:
    assert double(build_op_context(), [1, 3]) == [2, 6]
    assert no_context() == 1


def _define(body) -> None:  # type: ignore[no-untyped-def]
    job(name="j")(body)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: op(name="bad name")(lambda context: 1), "must match"),
        (lambda: op(name="o")(lambda *args: 1), "plain positional"),
        (lambda: op(name="o", tags={"a": 1})(lambda context: 1), "strings"),
        (lambda: _define(lambda: add(extract())), "takes 2 inputs"),
        (lambda: _define(lambda: double(5)), "argument 1 of op double_it"),
        (lambda: _define(lambda: None), "calls no op"),
        (lambda: _define(lambda: 1 / 0), "ZeroDivisionError"),
        (lambda: job(name="j", executor=5)(lambda: extract()), "executor"),
        (lambda: RetryPolicy(backoff=Backoff.LINEAR), "need a delay"),
        (lambda: RetryPolicy(jitter=Jitter.FULL), "need a delay"),
        (lambda: RetryPolicy(max_retries=-1), ">= 0"),
    ],
)
def test_invalid_definitions(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DefinitionError, match=message):
        make()


@job
def target():
    extract()


@pytest.mark.parametrize(
    "cron", ["60 * * * *", "*/0 * * * *", "0 0 1 13 *", "@reboot", "* * * * * *",
             "0 0 31 2 *", "0 0 * * 8", "* * * *\n* * * * *"],
)  # fmt: skip
def test_bad_cron_is_a_definition_error(cron: str) -> None:
    with pytest.raises(DefinitionError, match="cron"):
        schedule(job=target, cron=cron, name="s")(lambda context: None)


@pytest.mark.parametrize("tz", ["Mars/Olympus", "../../etc/passwd", "/etc/localtime", "UTC\x00"])
def test_bad_timezone_is_a_definition_error(tz: str) -> None:
    with pytest.raises(DefinitionError, match="timezone"):
        schedule(job=target, cron="0 * * * *", timezone=tz, name="s")(lambda context: None)


def test_definitions_collects_and_checks_names() -> None:
    @schedule(job=target, cron="*/5 * * * *", timezone="Europe/Berlin")
    def every_five(context):
        return RunRequest(tags={"source": "cron"})

    @sensor(job=target, minimum_interval_seconds=10)
    def files(context):
        return SkipReason("nothing new")

    defs = Definitions(schedules=[every_five], sensors=[files])
    assert defs.get_job("target") is target  # added through the schedule
    assert every_five.timezone == "Europe/Berlin" and files.minimum_interval_seconds == 10
    with pytest.raises(KeyError, match="no job named"):
        defs.get_job("nope")
    with pytest.raises(DefinitionError, match="two jobs"):
        Definitions(jobs=[target, target])

    @job(name="target")
    def impostor():
        extract()

    with pytest.raises(DefinitionError, match="different job"):
        Definitions(jobs=[impostor], schedules=[every_five])


@pytest.mark.parametrize(
    ("policy", "delays"),
    [
        (RetryPolicy(max_retries=3), [0.0, 0.0, 0.0]),
        (RetryPolicy(delay=2), [2.0, 2.0, 2.0]),
        (RetryPolicy(delay=2, backoff=Backoff.LINEAR), [2.0, 4.0, 6.0]),
        (RetryPolicy(delay=1, backoff=Backoff.EXPONENTIAL), [1.0, 3.0, 7.0]),
    ],
)
def test_retry_delays(policy: RetryPolicy, delays: list[float]) -> None:
    assert [policy.calculate_delay(n) for n in (1, 2, 3)] == delays


def test_retry_jitter() -> None:
    full = RetryPolicy(delay=1, backoff=Backoff.EXPONENTIAL, jitter=Jitter.FULL)
    rng, expected = random.Random(7), random.Random(7)
    assert full.calculate_delay(2, rng) == pytest.approx(expected.random() * 3.0)
    plus_minus = RetryPolicy(delay=1, jitter=Jitter.PLUS_MINUS)
    values = [plus_minus.calculate_delay(1, random.Random(seed)) for seed in range(50)]
    assert all(0.0 <= v <= 2.0 for v in values) and len(set(values)) > 10
