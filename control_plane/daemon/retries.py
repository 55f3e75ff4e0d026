"""Run retries: a failed run gets a new run for the same job, config and tags.

As in Dagster's run retries, plus a delay with backoff. The failure and the "retry
pending" mark are written in one transaction; this loop then decides (`decide_retry`, a
pure function) and `Storage.settle_retry` records the decision and queues the retry in
another, which checks and clears the mark: exactly one retry per failure, also across
restarts.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from control_plane.bus import WakeBus, run_queued
from control_plane.config import RunRetriesConfig
from control_plane.model.runs import NewRun, Run
from control_plane.model.statuses import OP_FAILURE
from control_plane.model.submission import (
    DEFAULT_RUN_RULES,
    RunRefused,
    RunRules,
    check_new_run,
    new_run,
)
from control_plane.storage.port import RunStore
from protocol.tags import (
    MAX_RETRIES_TAG,
    PARENT_TAG,
    RETRY_NUMBER_TAG,
    RETRY_ON_OP_FAILURE_TAG,
    RETRY_STRATEGY_TAG,
    ROOT_TAG,
)

log = logging.getLogger("fleetrun.retries")


@dataclass
class RetryDecision:
    retry: NewRun | None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def retry_delay(config: RunRetriesConfig, retry_number: int) -> float:
    """Seconds before retry `retry_number` (1 for the first) may start."""
    if config.backoff == "linear":
        return retry_number * config.delay_seconds
    if config.backoff == "exponential":
        return (2.0**retry_number - 1) * config.delay_seconds
    return config.delay_seconds


def decide_retry(
    run: Run,
    config: RunRetriesConfig,
    now: float,
    new_run_id: str,
    rules: RunRules = DEFAULT_RUN_RULES,
) -> RetryDecision:
    """Whether a failed run is retried, and the retry run if so (held to the rules of
    every new run: a retry that could not be launched is not made). Every decision has a
    message, "not retried" ones too: the run's RUN_RETRY event says why."""
    if not config.enabled:
        return RetryDecision(None, "not retried: run retries are off ([run_retries] enabled)")
    max_retries = int(run.tags.get(MAX_RETRIES_TAG, config.max_retries))
    number = int(run.tags.get(RETRY_NUMBER_TAG, "0"))
    data: dict[str, Any] = {"max_retries": max_retries, "failure_kind": run.failure_kind}
    if max_retries <= 0:
        return RetryDecision(
            None,
            f"not retried: max_retries is 0 (tag {MAX_RETRIES_TAG} or [run_retries] max_retries)",
            data,
        )
    on_op_failure = run.tags.get(RETRY_ON_OP_FAILURE_TAG)
    if on_op_failure is None:
        on_op_failure, source = str(config.retry_on_op_failure).lower(), "retry_on_op_failure"
    else:
        source = f"tag {RETRY_ON_OP_FAILURE_TAG}"
    if run.failure_kind == OP_FAILURE and on_op_failure != "true":
        return RetryDecision(None, f"not retried: an op failed and {source} is false", data)
    if number >= max_retries:
        return RetryDecision(None, f"not retried: all {max_retries} retries used", data)
    next_number = number + 1
    delay = retry_delay(config, next_number)
    root = run.root_run_id or run.run_id
    lineage = {PARENT_TAG: run.run_id, ROOT_TAG: root, RETRY_NUMBER_TAG: str(next_number)}
    retry = new_run(
        new_run_id,
        run.job,
        run.location,
        run.tags,
        run.config,
        own_tags=lineage,
        not_before=now + delay if delay > 0 else None,
        parent_run_id=run.run_id,
        root_run_id=root,
    )
    try:
        check_new_run(retry, rules, reserved_ok=True)
    except RunRefused as exc:
        return RetryDecision(None, f"not retried: {exc.message}", data)
    message = f"retry {next_number} of {max_retries} queued as run {new_run_id}"
    if delay > 0:
        message += f"; it starts after {delay:g} s"
    return RetryDecision(
        retry, message, {**data, "retry_run_id": new_run_id, "delay_seconds": delay}
    )


@dataclass(frozen=True)
class Retrier:
    """What a retry pass works with."""

    storage: RunStore
    config: RunRetriesConfig
    bus: WakeBus
    rules: RunRules = DEFAULT_RUN_RULES


async def retry_pass(retrier: Retrier, now: float) -> None:
    """Decide every failed run not yet decided, and queue the retries decided on."""
    storage = retrier.storage
    while pending := await storage.pending_retries(100):
        for run in pending:
            try:
                decision = decide_retry(run, retrier.config, now, str(uuid.uuid4()), retrier.rules)
            except ValueError as exc:  # e.g. a tag stored before it was validated
                decision = RetryDecision(None, f"not retried: {exc}")
            if decision.retry is not None and run.tags.get(RETRY_STRATEGY_TAG) != "ALL_STEPS":
                decision.retry.reuse_outputs = await storage.reusable_outputs(run)
            created = await storage.settle_retry(
                run.run_id, decision.retry, decision.message, decision.data, now
            )
            if decision.message:
                log.info(
                    "run %s: %s",
                    run.run_id,
                    decision.message,
                    extra={"run_id": run.run_id, "agent": run.agent_id},
                )
            if created is not None:
                run_queued(retrier.bus, created)
